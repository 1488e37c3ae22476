"""The MLflow half of resuming a training (the files half is :mod:`tasks.training.resume`):
close a run a killed process left ``RUNNING``, choose the run to continue or to link to, and
record which run trains a checkpoint folder. On rank 0 only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import mlflow

from tasks.errors import MedtransferError
from tasks.tracking.runs import close_run, run_status
from tasks.training.checkpoints import (
    RunRecord,
    owner_alive,
    read_run_record,
    this_process,
    write_run_record,
)
from tasks.training.loop import CHECKPOINT_NAME
from tasks.training.resume import ResumePlan

logger = logging.getLogger(__name__)


def plan_run(plan: ResumePlan, experiment_id: str) -> ResumePlan:
    """Rank 0's half of a plan: close the stale run of this configuration, and choose the MLflow
    run to continue (an interrupted one) or to link to (the one whose checkpoint a new run
    continues)."""
    status = close_stale_runs(plan.previous, experiment_id) if plan.previous else None
    if plan.seed_from is not None:
        other = read_run_record(plan.seed_from)
        return replace(plan, linked_run_id=other.run_id if other else None)
    if not plan.resume or plan.previous is None:
        return plan
    if status in ("KILLED", "FAILED"):
        return replace(plan, continue_run_id=plan.previous.run_id)
    if status == "FINISHED" and (plan.folder / CHECKPOINT_NAME).is_file():
        # A finished training's run stays as it ended; a new one re-evaluates its checkpoint.
        return replace(plan, linked_run_id=plan.previous.run_id)
    return plan


def close_stale_runs(record: RunRecord, experiment_id: str) -> str | None:
    """End ``KILLED`` the run (and parent run) of ``record`` that a killed process left
    ``RUNNING``, saying so in a log line; returns the run's status after that.

    Raises:
        MedtransferError: the process that wrote ``record`` is still alive: it is training this
            configuration right now, into the same checkpoint folder.
    """
    status = run_status(record.run_id, experiment_id)
    parent = run_status(record.parent_run_id, experiment_id) if record.parent_run_id else None
    if "RUNNING" not in (status, parent):
        return status
    if owner_alive(record):
        raise MedtransferError(
            f"Another training of this configuration is still running (pid {record.pid}, "
            f"MLflow run {record.run_id}); wait for it to end or stop it first."
        )
    for run_id, run_state in ((record.run_id, status), (record.parent_run_id, parent)):
        if run_state == "RUNNING":
            close_run(run_id, "KILLED")
            logger.warning(
                "closed stale MLflow run %s as KILLED: left RUNNING by a training that was "
                "killed (pid %d on %s)",
                run_id,
                record.pid,
                record.host,
            )
    return "KILLED" if status == "RUNNING" else status


def parent_to_continue(
    plans: Mapping[tuple[str, float], ResumePlan], experiment_id: str
) -> str | None:
    """The interrupted parent run of a comparison whose child runs are being continued (its
    stale ``RUNNING`` state already closed by :func:`close_stale_runs`)."""
    for plan in plans.values():
        parent = plan.previous.parent_run_id if plan.previous else None
        continued = plan.continue_run_id is not None and parent is not None
        if continued and run_status(parent, experiment_id) in ("KILLED", "FAILED"):
            return parent
    return None


def record_run(run, plan: ResumePlan) -> None:
    """Write the run record beside the checkpoint as soon as the run exists: if this process is
    killed, the next run of this configuration finds the run to close and continue."""
    parent = run.data.tags.get("mlflow.parentRunId")
    write_run_record(plan.folder, this_process(run.info.run_id, parent, plan.configuration))
    if plan.linked_run_id is not None:
        mlflow.set_tag("medtransfer.continues_run", plan.linked_run_id)
