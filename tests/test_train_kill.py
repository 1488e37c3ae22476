"""A training killed at any moment and resumed ends with the uninterrupted training's student.

Like :mod:`tests.test_atomic`, the test runs the real ``medtransfer`` command in temporary
projects (a copy of params.yaml, every path relative to it, tiny sizes), SIGKILLs its process
group at seeded points, runs ``medtransfer train --resume`` after each kill, and compares the
outcome with an uninterrupted training's, tensor by tensor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import atomic
from tasks.model.student_io import MODEL_FILE, load_student
from tasks.training.checkpoints import RUN_RECORD_NAME, read_run_record
from tasks.training.loop import CHECKPOINT_NAME
from tests.processes import kill_group_when

REPO = Path(__file__).resolve().parent.parent
DATA = ["synthetic.n_patients=16", "synthetic.size=64", "data.image_size=32", "data.workers=1"]
# A linear probe on the CPU: about 0.3 s per epoch here. Patience as long as the training, so
# every run has the same number of epochs to kill into; lr 0.01 moves the validation AUC, so the
# selected student is not simply the first epoch's.
EPOCHS = 10
TRAIN = [
    "train.strategy=linear_probe",
    f"train.epochs={EPOCHS}",
    f"train.patience={EPOCHS}",
    "train.batch_size=16",
    "train.lr=0.01",
    "train.num_workers=0",
    "train.device=cpu",
]
# What an epoch's row holds that depends on the clock, not on the training.
TIMINGS = ("seconds", "images_per_s")


def _project(root: Path, mlflow_db: Path) -> Path:
    """A temporary project: a copy of params.yaml and of an empty, migrated MLflow store."""
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(mlflow_db, root / "mlflow.db")
    return root


def _command(subcommand: str, *flags: str) -> list[str]:
    """``medtransfer <subcommand> --quiet -S ...`` at the tiny sizes, run with this interpreter."""
    settings = [part for item in [*DATA, *TRAIN] for part in ("-S", item)]
    return [sys.executable, "-m", "flows.cli", subcommand, "--quiet", *flags, *settings]


def _environment(root: Path) -> dict[str, str]:
    """This environment with the repository first on the import path, one thread (the same
    arithmetic in every process), and the project's own MLflow store and artifact folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    return env


def _run(root: Path, subcommand: str, *flags: str) -> None:
    """Run the command to its end; fail the test, showing its output, unless it exits 0."""
    done = subprocess.run(
        _command(subcommand, *flags),
        cwd=root,
        env=_environment(root),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]


def _kill_when(
    root: Path, flags: tuple[str, ...], ready: Callable[[int], bool]
) -> tuple[bool, bool]:
    """Start ``medtransfer train`` and SIGKILL its whole process group as soon as
    ``ready(pid)`` holds.

    Returns whether the kill landed (False: the command had ended on its own) and whether it
    landed mid-training: after this process recorded its run beside the checkpoint and before
    it saved the student.
    """
    student = root / "models" / "student" / MODEL_FILE
    student.unlink(missing_ok=True)
    pids: list[int] = []

    def ready_noting_pid(pid: int) -> bool:
        pids[:] = [pid]
        return ready(pid)

    landed = kill_group_when(
        _command("train", *flags),
        root,
        _environment(root),
        ready_noting_pid,
        timeout=120,
        poll_seconds=0.002,
    )
    mid_training = landed and _training_began(root, pids[0]) and not student.exists()
    return landed, mid_training


def _checkpoint_folder(root: Path) -> Path | None:
    """The one checkpoint folder of the project's training (``None`` before it exists)."""
    folders = sorted((root / "models" / "checkpoints").glob("linear_probe-*"))
    assert len(folders) <= 1, folders  # one configuration: one folder, however often killed
    return folders[0] if folders else None


def _training_began(root: Path, pid: int) -> bool:
    """Whether process ``pid`` has started its training: its run record sits by the checkpoint."""
    folder = _checkpoint_folder(root)
    record = read_run_record(folder) if folder is not None else None
    return record is not None and record.pid == pid


class _CheckpointWrites:
    """Counts the checkpoints written since it was made: each epoch's ``last.pt`` is renamed in
    whole, so a new (inode, modification time) is one more epoch saved (two files alternate
    between two inodes, hence the time too)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.last = self._inode()

    def _inode(self) -> tuple[int, int] | None:
        folder = _checkpoint_folder(self.root)
        with contextlib.suppress(FileNotFoundError):
            if folder is not None:
                found = (folder / CHECKPOINT_NAME).stat()
                return found.st_ino, found.st_mtime_ns
        return None

    def written(self) -> int:
        """How many checkpoints were written so far (polled often enough to see each epoch's)."""
        inode = self._inode()
        if inode is not None and inode != self.last:
            self.count, self.last = self.count + 1, inode
        return self.count


def _after_checkpoints(root: Path, n: int) -> Callable[[int], bool]:
    """Ready once the run has written ``n`` epoch checkpoints."""
    writes = _CheckpointWrites(root)
    return lambda pid: writes.written() >= n


def _into_an_epoch(root: Path, fraction: float) -> Callable[[int], bool]:
    """Ready ``fraction`` of an epoch's time into the run's third epoch: two checkpoints in, the
    time between them measures an epoch on this machine, at its load of the moment."""
    writes, seen = _CheckpointWrites(root), [time.monotonic()]

    def ready(pid: int) -> bool:
        if writes.written() >= len(seen):
            seen.append(time.monotonic())
        if len(seen) < 3:
            return False
        return time.monotonic() >= seen[2] + fraction * (seen[2] - seen[1])

    return ready


def _partial_checkpoints(root: Path) -> set[str]:
    """The partial checkpoints beside ``last.pt``: the temporaries of its atomic writes (see
    :func:`tasks.atomic.write_file`), in progress or left by a killed writer."""
    folder = _checkpoint_folder(root)
    pattern = f".{CHECKPOINT_NAME}.*{atomic.PARTIAL_SUFFIX}"
    return {path.name for path in folder.glob(pattern)} if folder is not None else set()


def _while_writing_a_checkpoint(root: Path) -> Callable[[int], bool]:
    """Ready as soon as a new partial checkpoint shows (one that an earlier kill left does not
    count), or else once the next checkpoint is in place."""
    writes, left_before = _CheckpointWrites(root), _partial_checkpoints(root)
    return lambda pid: bool(_partial_checkpoints(root) - left_before) or writes.written() >= 1


def _files(root: Path) -> list[str]:
    """Every file under the project's models/, relative to it: the student, the checkpoint
    folder and anything a killed writer left beside them."""
    models = root / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*") if not p.is_dir())


def _leftovers(root: Path) -> list[str]:
    """Temporary files and folders under models/ (atomic writes' and run records')."""
    marks = (atomic.PARTIAL_SUFFIX, ".tmp", atomic.STAGING_MARK, atomic.ASIDE_MARK)
    return [name for name in _files(root) if any(mark in name for mark in marks)]


def _checkpoint(root: Path) -> dict:
    """The project's ``last.pt``."""
    folder = _checkpoint_folder(root)
    assert folder is not None
    return torch.load(folder / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def _rows(history: list[dict]) -> list[dict]:
    """A checkpoint's per-epoch rows without their timings."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


def _assert_same_tensors(actual: object, expected: object, where: str) -> None:
    """``actual`` equals ``expected`` exactly: nested dicts and lists, tensors by ``torch.equal``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same_tensors(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.slow
def test_training_killed_at_seeded_points_and_resumed_ends_with_the_uninterrupted_student(
    tmp_path: Path, empty_mlflow_db: Path
) -> None:
    """Kill ``medtransfer train`` after a seeded number of epoch checkpoints, a seeded fraction
    into an epoch, and while it writes a checkpoint; ``--resume`` after each kill. Every
    checkpoint a kill leaves holds the uninterrupted training's epochs; the last resume saves
    the uninterrupted student and checkpoint, tensor for tensor, and models/ holds the same
    files: no temporaries, no extra checkpoint folders."""
    uninterrupted = _project(tmp_path / "uninterrupted", empty_mlflow_db)
    _run(uninterrupted, "ingest")
    killed = tmp_path / "killed"
    shutil.copytree(uninterrupted, killed)  # the same dataset, ingested once
    _run(uninterrupted, "train")
    expected_student = load_student(uninterrupted / "models" / "student")[0].state_dict()
    expected_checkpoint = _checkpoint(uninterrupted)
    expected_rows = _rows(expected_checkpoint["history"])
    assert len(expected_rows) == EPOCHS

    rng = np.random.default_rng(20260311)
    first, last, fraction = (*(int(k) for k in rng.integers(1, 3, size=2)), rng.uniform())
    # (flags, when to kill); each watch is made just before its run starts.
    plans: list[tuple[tuple[str, ...], Callable[[], Callable[[int], bool]]]] = [
        ((), lambda: _after_checkpoints(killed, first)),
        (("--resume",), lambda: _into_an_epoch(killed, float(fraction))),
        (("--resume",), lambda: _while_writing_a_checkpoint(killed)),
        (("--resume",), lambda: _after_checkpoints(killed, last)),
    ]
    landed = mid_training = 0
    for flags, watch in plans:
        did_land, did_interrupt = _kill_when(killed, flags, watch())
        landed += did_land
        mid_training += did_interrupt
        folder = _checkpoint_folder(killed)
        assert folder is not None
        extra = {p.name for p in folder.iterdir()} - {CHECKPOINT_NAME, RUN_RECORD_NAME}
        assert len(extra) <= 1, extra  # at most the temporary the kill cut short
        saved = (folder / CHECKPOINT_NAME).exists()
        rows = _rows(_checkpoint(killed)["history"]) if saved else []
        assert rows == expected_rows[: len(rows)], f"after kill {landed}"
    assert landed == len(plans), "every kill must land before the training ends"
    assert mid_training == len(plans), "every kill must land while the training runs"

    _run(killed, "train", "--resume")
    student = load_student(killed / "models" / "student")[0].state_dict()
    _assert_same_tensors(student, expected_student, "student")
    checkpoint = _checkpoint(killed)
    for part in ("model", "optimizer", "scheduler", "best_state", "best_epoch"):
        _assert_same_tensors(checkpoint[part], expected_checkpoint[part], part)
    assert _rows(checkpoint["history"]) == expected_rows
    assert _leftovers(killed) == []
    assert _files(killed) == _files(uninterrupted)
