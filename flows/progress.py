"""Training progress in the Prefect UI: a progress artifact the flow's train task updates.

:class:`PrefectProgressRecorder` is a training-loop recorder
(:class:`tasks.training.types.TrainingRecorder`): each fit creates one progress artifact
and moves it after every epoch, with that epoch's numbers as its description. It lives in
``flows/`` because only the flow knows Prefect; the loop just calls its recorders.
"""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.training.types import FitResult, TrainingRecorder

TRAIN_PROGRESS_KEY = "medtransfer-train-progress"


class PrefectProgressRecorder(TrainingRecorder):
    """Shows a fit's share of epochs done (0 to 100) as a Prefect progress artifact.

    Args:
        key: the artifact's key (lowercase letters, digits and dashes; Prefect's rule); every
            fit makes a new artifact under it, so a comparison shows one per training.
    """

    def __init__(self, key: str = TRAIN_PROGRESS_KEY) -> None:
        self.key = key
        self._artifact_id: UUID | None = None
        self._total_epochs = 0

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        """Create the artifact at the share already done (above 0 after a resume)."""
        self._total_epochs = total_epochs
        where = f"resumed at epoch {start_epoch + 1}" if start_epoch else "started"
        self._artifact_id = create_progress_artifact(
            progress=_percent(start_epoch, total_epochs),
            key=self.key,
            description=f"training on {n_train} images for {total_epochs} epochs, {where}",
        )

    def epoch_ended(self, row: dict[str, float]) -> None:
        """Move the artifact to the epochs done, describing the epoch just finished."""
        if self._artifact_id is None:
            return
        done = int(row["epoch"])  # 1-based: the epochs done
        update_progress_artifact(
            self._artifact_id,
            progress=_percent(done, self._total_epochs),
            description=f"epoch {done}/{self._total_epochs}: train loss "
            f"{row['train_loss']:.4f}, val AUC {row['val_auc']:.3f}",
        )

    def fit_ended(self, result: FitResult) -> None:
        """Show 100 %: early stopping finishes the training too, before its last epoch."""
        if self._artifact_id is None:
            return
        stopped = ", stopped early" if result.stopped_early else ""
        update_progress_artifact(
            self._artifact_id,
            progress=100.0,
            description=f"done: best epoch {result.best_epoch}/{self._total_epochs}, "
            f"{len(result.history)} epochs run{stopped}",
        )
        self._artifact_id = None


def _percent(done: int, total: int) -> float:
    """``done`` of ``total`` as a percentage in [0, 100] (100 for an empty total)."""
    return 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
