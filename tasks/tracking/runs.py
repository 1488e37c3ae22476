"""How an MLflow run ends (honestly: ``FINISHED``, ``FAILED`` or ``KILLED``), and the state of
runs other than the active one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow.exceptions import MlflowException

from tasks.signals import Terminated, sigterm_deferred


def end_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with: ``FINISHED`` without ``error``, ``KILLED`` when the
    user or the system stopped it (Ctrl-C, SIGTERM), ``FAILED`` for any other exception."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | Terminated):
        return "KILLED"
    return "FAILED"


@contextmanager
def ended_honestly(active: bool = True) -> Iterator[None]:
    """End the active MLflow run on the way out with :func:`end_status` of what happened, and
    let any exception through. ``active=False``: there is no run here (off rank 0), do nothing.

    ``mlflow.start_run``'s own context marks Ctrl-C ``FAILED`` and a bare ``end_run`` in a
    ``finally`` marks everything ``FINISHED``: neither says what happened.
    """
    try:
        yield
    except BaseException as error:
        if active:
            with sigterm_deferred():  # a second SIGTERM must not cut the run's ending short
                mlflow.end_run(end_status(error))
        raise
    if active:
        with sigterm_deferred():
            mlflow.end_run(end_status(None))


def run_status(run_id: str, experiment_id: str) -> str | None:
    """The status of ``run_id`` (``RUNNING``, ``FINISHED``, ...), or ``None`` when this store has
    no such live run in ``experiment_id`` (another store or experiment, or a deleted run): such
    a run can be neither closed nor continued from here."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return run.info.status


def close_run(run_id: str, status: str = "KILLED") -> None:
    """End ``run_id`` (not the active run) with ``status``."""
    mlflow.MlflowClient().set_terminated(run_id, status)
