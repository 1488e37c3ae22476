"""Resume planning: which checkpoint each (strategy, fraction) training continues.

Files only, on every rank (the MLflow half, closing stale runs and choosing the run to
continue, is :mod:`tasks.tracking.resume`). A training's checkpoint folder is named by a digest
of its whole configuration (:func:`checkpoint_configuration`): new data, code or parameters
start a fresh training instead of resuming a finished checkpoint of the old ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks.code_closure import code_version
from tasks.config import Params, flatten_params
from tasks.data.dataset import without_source_paths
from tasks.errors import MedtransferError
from tasks.training.checkpoints import (
    RunRecord,
    changed_keys,
    checkpoint_fits,
    copy_checkpoint,
    latest_other_checkpoint,
    read_run_record,
)
from tasks.training.loop import CHECKPOINT_NAME

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

# How ``resume`` treats a checkpoint (``run_train(resume=True)`` is ``"matching"``):
# matching: continue this exact configuration's checkpoint if there is one, else start afresh
#     without a word; the Prefect flow always resumes, and new data, code or parameters must
#     simply train anew there (the checkpoint folder's name covers all three).
# strict: ``medtransfer train --resume``, a person asking to continue: when only another
#     configuration's checkpoint exists, stop with an error naming the keys that changed.
# force: ``--resume=force``: continue that other configuration's latest checkpoint under the
#     new values (say, more epochs), in a new MLflow run tagged with the one it continues.
ResumeMode = Literal["matching", "strict", "force"]


@dataclass(frozen=True)
class ResumePlan:
    """How one (strategy, fraction) training starts; every plan is made before any training."""

    folder: Path  # this configuration's checkpoint folder
    configuration: dict[str, str]  # what the folder's name digests, key by key
    resume: bool  # fit continues the folder's checkpoint when there is one
    previous: RunRecord | None  # the folder's run record: its latest training's MLflow run
    seed_from: Path | None = None  # force: the other configuration's folder to continue
    continue_run_id: str | None = None  # rank 0: an interrupted MLflow run to continue
    linked_run_id: str | None = None  # rank 0: the run whose checkpoint a new run continues


def resume_mode(resume: bool | ResumeMode) -> ResumeMode | None:
    """``run_train``'s ``resume`` as a mode; ``None``: start afresh."""
    if resume is False:
        return None
    if resume is True:
        return "matching"
    if resume not in ("matching", "strict", "force"):
        raise MedtransferError(f"resume={resume!r}: choose True, False, 'strict' or 'force'.")
    return resume


def checkpoint_configuration(params: Params, data_version: str) -> dict[str, str]:
    """What a checkpoint was trained with, flat (``train.lr``, ...): the ``seed``, ``data`` and
    ``train`` parameters, the dataset's content (``dataset_version``, the processed folder's DVC
    hash) and the train stage's code (``code_version``, :func:`tasks.code_closure.code_version`).
    """
    sections = params.to_dict()
    relevant = {k: sections[k] for k in ("seed", "data", "train")}
    relevant["data"] = without_source_paths(relevant["data"])  # names are data: no paths
    relevant["dataset_version"] = data_version
    relevant["code_version"] = code_version("train")
    return flatten_params(relevant)


def run_key(configuration: dict[str, str], strategy: str, fraction: float) -> str:
    """The checkpoint folder's name for one (strategy, fraction): resume never mixes runs.

    A digest of the whole :func:`checkpoint_configuration`, so new data, code or parameters
    start a fresh training instead of resuming a finished checkpoint of the old ones (the flow
    always resumes). Returns ``"<strategy>-<fraction>-<digest>"``.
    """
    digest = hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()
    return f"{strategy}-{fraction:g}-{digest[:12]}"


def plan_checkpoint(
    params: Params, strategy: str, fraction: float, data_version: str, mode: ResumeMode | None
) -> ResumePlan:
    """Which checkpoint one training continues (on every rank: files only, no MLflow).

    Raises:
        MedtransferError: ``mode`` is ``"strict"`` and the latest checkpoint of this
            (strategy, fraction) was made with other parameters, data or code.
    """
    configuration = checkpoint_configuration(params, data_version)
    root = Path(params.train.checkpoint_dir)
    folder = root / run_key(configuration, strategy, fraction)
    plan = ResumePlan(
        folder, configuration, resume=mode is not None, previous=read_run_record(folder)
    )
    if mode in (None, "matching") or (folder / CHECKPOINT_NAME).is_file() or plan.previous:
        return plan
    other = latest_other_checkpoint(root, f"{strategy}-{fraction:g}-", exclude=folder)
    if other is None:
        logger.info("no checkpoint of %s@%g to resume: training from the start", strategy, fraction)
        return plan
    if mode == "strict":
        before = read_run_record(other)
        raise MedtransferError(
            _changed_message(
                strategy, fraction, other, before.configuration if before else {}, configuration
            )
        )
    logger.warning("--resume=force: continuing the checkpoint in %s with new values", other)
    return replace(plan, seed_from=other)


def _changed_message(
    strategy: str, fraction: float, other: Path, before: dict[str, str], after: dict[str, str]
) -> str:
    """The one-line refusal of a ``--resume`` whose checkpoint has other values."""

    def short(value: str | None) -> str:
        text = "(none)" if value is None else " ".join(value.split())
        return text if len(text) <= 40 else text[:37] + "..."

    changes = ", ".join(
        f"{key} ({short(before.get(key))} -> {short(after.get(key))})"
        for key in changed_keys(before, after)
    )
    return (
        f"--resume: changed since the checkpoint of {strategy}@{fraction:g} in {other}: "
        f"{changes}; use --resume=force to continue it with the new values, or leave out "
        "--resume to start afresh"
    )


def continue_other_checkpoint(plan: ResumePlan, model: nn.Module) -> None:
    """``--resume=force``: copy the other configuration's checkpoint into this one's folder
    (unless an earlier forced run already did and trained on), so that fit continues it and the
    other stays as it was. Every rank copies: each one's fit reads the folder."""
    if (plan.folder / CHECKPOINT_NAME).is_file():
        return
    if not checkpoint_fits(plan.seed_from, model):
        raise MedtransferError(
            f"--resume=force: the checkpoint in {plan.seed_from} was made for another network "
            "(teacher, strategy or head) and cannot be continued; leave out --resume."
        )
    copy_checkpoint(plan.seed_from, plan.folder)
