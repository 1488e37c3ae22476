"""MLflow set-up shared by the stages that log: tracking URI, experiment, flattened params,
the training loop's MLflow recorder, and how a run ends honestly.

A run ends ``FINISHED`` only when its work is done: an exception ends it ``FAILED``, Ctrl-C or
SIGTERM ``KILLED`` (:func:`ended_honestly`, :func:`sigterm_raises`). SIGKILL leaves it
``RUNNING``; the train stage closes such a stale run the next time it trains the same
configuration.

Embedded default: a SQLite store (``mlflow.db``) and a local artifact folder (``mlartifacts/``)
inside the project, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows every run.
A tracking server is configuration: set ``mlflow.tracking_uri`` (or ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.training.types import FitResult, TrainingRecorder

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one parameter value
# The experiment tag the MLflow UI reads to choose its layout (mlflow/server/js: without it the
# UI infers the kind and opened medtransfer's experiment on the empty GenAI trace overview).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5  # CPU, memory, disk and GPU sampled into each training run
MODEL_NAME = "model"  # the name of the student each training run logs
MAX_DIGEST = 36  # MLflow's dataset digest column (DVC's "<md5>.dir" is exactly 36)
# Exit statuses of the ``medtransfer`` command when stopped, as a shell reports a signal.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised as an exception (see :func:`sigterm_raises`) so that ``finally`` blocks
    and run records see it. A ``BaseException``, as ``KeyboardInterrupt`` is: ``except
    Exception`` must not swallow a request to stop."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``; the previous handler is restored on the way out.

    Python's default for SIGTERM ends the process at once, with no unwinding, which would leave
    an MLflow run ``RUNNING`` forever. Outside the main thread (a Prefect task's worker) Python
    allows no handler: nothing is installed, and the process's own handling stays in charge.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        stop = Terminated(f"stopped by signal {signal.Signals(signum).name}")
        if _store_writes_open:
            _pending_stop.append(stop)  # raised when the store write ends (see store_write)
            return
        raise stop

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Store writes in progress, and a SIGTERM that arrived during one. An exception raised in the
# middle of a SQLite write can leave that connection's transaction open, and the run could then
# not be ended (`database is locked`): the stop waits for the write to finish.
_store_writes_open = 0
_pending_stop: list[Terminated] = []


@contextmanager
def store_write() -> Iterator[None]:
    """Mark an MLflow store write (also usable as a decorator): a SIGTERM arriving inside is
    raised as :class:`Terminated` right after it, never in the middle of it."""
    global _store_writes_open
    _store_writes_open += 1
    try:
        yield
    finally:
        _store_writes_open -= 1
    if not _store_writes_open and _pending_stop:
        stop = _pending_stop.pop()
        _pending_stop.clear()
        raise stop


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
    import mlflow

    try:
        yield
    except BaseException as error:
        if active:
            with store_write():  # a second SIGTERM must not cut the run's ending short
                mlflow.end_run(end_status(error))
        raise
    if active:
        with store_write():
            mlflow.end_run(end_status(None))


def configure_mlflow(params: Params) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    ``MLFLOW_TRACKING_URI`` in the environment wins over ``mlflow.tracking_uri`` so that a test
    or a CI job can redirect every stage without editing params.yaml. The experiment is marked
    as model training (:data:`EXPERIMENT_KIND_TAG`), so the UI opens on its runs.
    """
    import mlflow

    section = params.mlflow
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or section.tracking_uri)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    name = section.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before medtransfer set it
            mlflow.MlflowClient().set_experiment_tag(
                experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id
    artifacts = os.environ.get("MEDTRANSFER_ARTIFACT_ROOT") or section.artifact_root
    location = artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()
    experiment_id = mlflow.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def dataset_label(location: str, kind: str) -> str:
    """A short name for a data source, as run names and the UI's dataset column show it:
    ``synthetic``, a file's stem (``breastmnist``) or a folder's name, with its parent's when
    the folder's own name is generic (``hospital-a/dicom``)."""
    if kind == "synthetic":
        return "synthetic"
    path = Path(location)
    if path.stem.lower() in {"dicom", "data", "images", "raw", "input"} and path.parent.name:
        return f"{path.parent.name}/{path.stem}"
    return path.stem or location


def mlflow_dataset(dataset, version: str):
    """The processed dataset (:class:`tasks.data.dataset.ProcessedDataset`) as an MLflow
    dataset: images ``(N, S, S)`` uint8 and labels ``(N,)``, the folder it was read from as its
    source and its DVC version (:func:`tasks.data.dataset.dataset_version`) as its digest, so
    runs on the same data show the same digest. No pixel value is stored, only the schema and
    the shape."""
    import mlflow.data

    source = dataset.source
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice and says so on every resolve
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return mlflow.data.from_numpy(
            dataset.images,
            targets=dataset.labels,
            source=Path(dataset.root).resolve().as_uri(),
            name=dataset_label(source.location, source.kind),
            digest=version[:MAX_DIGEST] or None,
        )


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to this environment: what loading its
    ``pt2`` program needs (torch, numpy)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy")]


def logged_model_id(run_id: str, name: str = MODEL_NAME) -> str | None:
    """The id of the model named ``name`` that run ``run_id`` logged (MLflow 3's LoggedModel),
    or ``None`` when it logged none."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs is not None else []:
        if client.get_logged_model(output.model_id).name == name:
            return output.model_id
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class MlflowRecorder(TrainingRecorder):
    """Logs the training loop's events to the MLflow run ``run_id``.

    After each epoch: every metric of the epoch's row (``train_loss``, ``images_per_s``,
    ``val_loss``, ``val_auc``, ``val_accuracy``, ``lr``, ``seconds``) at ``step=epoch``, leaving
    out non-finite values (a NaN AUC when val holds one class), which MLflow cannot plot. At the
    end: ``best_epoch`` and ``best_val_auc``, the epoch that model selection kept.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @store_write()
    def epoch_ended(self, row: dict[str, float]) -> None:
        """Log ``row``'s metrics at step ``row["epoch"]``."""
        import mlflow

        metrics = {k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}
        mlflow.log_metrics(metrics, step=int(row["epoch"]), run_id=self.run_id)

    @store_write()
    def fit_ended(self, result: FitResult) -> None:
        """Log the selected epoch and its validation score."""
        import mlflow

        mlflow.log_metrics(
            {"best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc},
            run_id=self.run_id,
        )


def run_status(run_id: str, experiment_id: str) -> str | None:
    """The status of ``run_id`` (``RUNNING``, ``FINISHED``, ...), or ``None`` when this store has
    no such live run in ``experiment_id`` (another store or experiment, or a deleted run): such
    a run can be neither closed nor continued from here."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return run.info.status


def close_run(run_id: str, status: str = "KILLED") -> None:
    """End ``run_id`` (not the active run) with ``status``."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> int:
    """Log to ``run_id`` the epoch rows of ``history`` that it lacks; returns how many.

    A continued run lacks the epoch whose checkpoint was written just before the process was
    killed, ahead of its metrics; a new run that continues another's checkpoint lacks them all.
    Either way the run's metric history then covers every epoch of the weights it ends with.
    """
    import mlflow

    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    recorder = MlflowRecorder(run_id)
    missing = [row for row in history if int(row["epoch"]) not in logged]
    for row in missing:
        recorder.epoch_ended(row)
    return len(missing)
