"""The training loop's MLflow recorder, and the epochs a continued run lacks."""

from __future__ import annotations

import math

import mlflow

from tasks.signals import sigterm_deferred
from tasks.training.types import FitResult, TrainingRecorder


class MlflowRecorder(TrainingRecorder):
    """Logs the training loop's events to the MLflow run ``run_id``.

    After each epoch: every metric of the epoch's row (``train_loss``, ``images_per_s``,
    ``val_loss``, ``val_auc``, ``val_accuracy``, ``lr``, ``seconds``) at ``step=epoch``, leaving
    out non-finite values (a NaN AUC when val holds one class), which MLflow cannot plot. At the
    end: ``best_epoch`` and ``best_val_auc``, the epoch that model selection kept.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @sigterm_deferred()
    def epoch_ended(self, row: dict[str, float]) -> None:
        """Log ``row``'s metrics at step ``row["epoch"]``."""
        metrics = {k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}
        mlflow.log_metrics(metrics, step=int(row["epoch"]), run_id=self.run_id)

    @sigterm_deferred()
    def fit_ended(self, result: FitResult) -> None:
        """Log the selected epoch and its validation score."""
        mlflow.log_metrics(
            {"best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc},
            run_id=self.run_id,
        )


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> int:
    """Log to ``run_id`` the epoch rows of ``history`` that it lacks; returns how many.

    A continued run lacks the epoch whose checkpoint was written just before the process was
    killed, ahead of its metrics; a new run that continues another's checkpoint lacks them all.
    Either way the run's metric history then covers every epoch of the weights it ends with.
    """
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    recorder = MlflowRecorder(run_id)
    missing = [row for row in history if int(row["epoch"]) not in logged]
    for row in missing:
        recorder.epoch_ended(row)
    return len(missing)
