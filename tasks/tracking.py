"""MLflow set-up shared by the stages that log: tracking URI, experiment, flattened params,
and the training loop's MLflow recorder.

Embedded default: a SQLite store (``mlflow.db``) and a local artifact folder (``mlartifacts/``)
inside the project, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows every run.
A tracking server is configuration: set ``mlflow.tracking_uri`` (or ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.training.recorders import TrainingRecorder

if TYPE_CHECKING:
    from tasks.training.loop import FitResult

from tasks.config import Params

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one parameter value


def configure_mlflow(params: Params) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    ``MLFLOW_TRACKING_URI`` in the environment wins over ``mlflow.tracking_uri`` so that a test
    or a CI job can redirect every stage without editing params.yaml.
    """
    import mlflow

    section = params.mlflow
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or section.tracking_uri)
    name = section.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifacts = os.environ.get("MEDTRANSFER_ARTIFACT_ROOT") or section.artifact_root
    location = artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()
    experiment_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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

    def epoch_ended(self, row: dict[str, float]) -> None:
        """Log ``row``'s metrics at step ``row["epoch"]``."""
        import mlflow

        metrics = {k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}
        mlflow.log_metrics(metrics, step=int(row["epoch"]), run_id=self.run_id)

    def fit_ended(self, result: FitResult) -> None:
        """Log the selected epoch and its validation score."""
        import mlflow

        mlflow.log_metrics(
            {"best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc},
            run_id=self.run_id,
        )
