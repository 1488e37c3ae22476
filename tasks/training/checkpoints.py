"""What sits beside a training's checkpoint, so that a later run can continue it honestly.

The train stage keeps each configuration's epoch checkpoint (``last.pt``, written by
:func:`tasks.training.loop.fit`) in a folder named by a digest of that configuration. Beside it,
``run.json`` (a :class:`RunRecord`) says which MLflow run trains it, which process does, and
the configuration itself, key by key. With that a later run can:

- continue the same MLflow run after a crash (its metrics then cover every epoch);
- tell a run left ``RUNNING`` by a killed process from one still training;
- name the keys that changed when an explicit ``--resume`` finds only another configuration's
  checkpoint.

No MLflow here (:mod:`tasks.tracking.resume` does the MLflow part).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.training.loop import CHECKPOINT_NAME

RUN_RECORD_NAME = "run.json"


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: the MLflow run (and parent run) of one checkpoint folder's training, the
    process that trains it, and the configuration it trains (flat ``section.key`` strings)."""

    run_id: str
    parent_run_id: str | None
    pid: int
    host: str
    configuration: dict[str, str]


def write_run_record(folder: Path, record: RunRecord) -> None:
    """Write ``run.json`` in ``folder`` atomically (a crash mid-write keeps the old one)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True))
    os.replace(tmp, folder / RUN_RECORD_NAME)


def read_run_record(folder: Path) -> RunRecord | None:
    """``folder``'s ``run.json``, or ``None`` when it has none or an unreadable one (a checkpoint
    from before run records: it can still be resumed, only not linked)."""
    try:
        content = json.loads((folder / RUN_RECORD_NAME).read_text())
        return RunRecord(**content)
    except (OSError, ValueError, TypeError):
        return None


def this_process(
    run_id: str, parent_run_id: str | None, configuration: dict[str, str]
) -> RunRecord:
    """The :class:`RunRecord` of a training that this process runs in MLflow run ``run_id``."""
    return RunRecord(
        run_id=run_id,
        parent_run_id=parent_run_id,
        pid=os.getpid(),
        host=socket.gethostname(),
        configuration=dict(configuration),
    )


def owner_alive(record: RunRecord) -> bool:
    """Whether another process on this machine that wrote ``record`` still runs.

    A record from another host counts as not alive: checkpoints live on this machine's disk, and
    a training elsewhere writing into the same folder could not be told apart anyway.
    """
    if record.host != socket.gethostname() or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def changed_keys(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The keys whose value differs between two configurations (added or removed ones too),
    sorted."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def latest_other_checkpoint(root: Path, prefix: str, exclude: Path) -> Path | None:
    """The most recently written checkpoint folder in ``root`` whose name starts with
    ``prefix`` and that has both a checkpoint and a run record, ``exclude`` left out; ``None``
    when there is none."""
    candidates = [
        folder
        for folder in root.glob(f"{prefix}*")
        if folder != exclude
        and (folder / CHECKPOINT_NAME).is_file()
        and (folder / RUN_RECORD_NAME).is_file()
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda folder: (folder / CHECKPOINT_NAME).stat().st_mtime)


def checkpoint_history(folder: Path) -> list[dict[str, float]]:
    """The per-epoch rows that ``folder``'s checkpoint holds (empty without a checkpoint)."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return []
    return list(torch.load(path, map_location="cpu", weights_only=True)["history"])


def checkpoint_fits(folder: Path, model: nn.Module) -> bool:
    """Whether ``folder``'s checkpointed weights load into ``model`` (same names, same shapes):
    a checkpoint of another teacher or head cannot be continued, whatever ``force`` says."""
    saved = torch.load(folder / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["model"]
    wanted = model.state_dict()
    return saved.keys() == wanted.keys() and all(saved[k].shape == wanted[k].shape for k in wanted)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy ``source``'s checkpoint into ``target`` atomically, so that training in ``target``
    continues it and ``source`` stays as it was. Every rank may call it at once: each copies
    to its own temporary name, and the last rename wins with the same content."""
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    shutil.copyfile(source / CHECKPOINT_NAME, tmp)
    os.replace(tmp, target / CHECKPOINT_NAME)
