"""The types the training loop, its recorders, the strategies and the train stage share.

Here so that none of them imports another for a type: the loop calls recorders
(:mod:`tasks.training.recorders`) with a :class:`FitResult`, and the recorders need not import
the loop (which imports torch and MONAI) to name it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from tasks.config import TrainParams

# FitConfig's fields that are not ``train`` keys: one training's seed, checkpoint folder and
# whether it continues that folder's checkpoint. Every other field is the ``train`` key of the
# same name.
_PER_TRAINING = ("seed", "checkpoint_dir", "resume")


@dataclass(frozen=True)
class FitConfig:
    """How to train (the loop-related keys of ``train`` in params.yaml; no defaults here,
    they live in params.yaml and reach the loop through :meth:`from_train`)."""

    epochs: int
    max_steps: int | None
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    patience: int
    class_weighting: str
    num_workers: int
    seed: int
    device: str
    amp: bool
    channels_last: bool
    checkpoint_dir: str
    resume: bool

    @classmethod
    def from_train(
        cls, train: TrainParams, seed: int, checkpoint_dir: str | Path, resume: bool
    ) -> FitConfig:
        """The loop's settings: each field from the ``train`` key of its name, plus this
        training's ``seed``, checkpoint folder and ``resume``."""
        shared = {
            f.name: getattr(train, f.name) for f in fields(cls) if f.name not in _PER_TRAINING
        }
        return cls(**shared, seed=seed, checkpoint_dir=str(checkpoint_dir), resume=resume)


@dataclass
class FitResult:
    """What ``fit`` returns: the selected weights and the history that chose them."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int  # the selected epoch's number, 1-based (0: no epoch ran)
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int | None = None  # the last epoch done before a resume (1-based)
    device: str = "cpu"
    # lp_ft only: its LP stage, {"l2", "train_loss", "val_loss"} (the probe's L2 strength
    # chosen on validation, its training loss and its validation cross-entropy)
    lp_stage: dict[str, float] | None = None


class TrainingRecorder(Protocol):
    """Receives the training loop's events; every method does nothing unless overridden.

    A class may subclass this protocol to inherit the do-nothing methods it does not need.
    """

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        """Training begins at ``start_epoch`` (0-based; > 0 after a resume) of ``total_epochs``,
        on ``n_train`` training images (the whole set, over every rank)."""

    def epoch_ended(self, row: dict[str, float]) -> None:
        """One epoch is done and checkpointed. ``row``: ``epoch`` (1-based, as every output
        counts: logs, reports, MLflow's step and ``best_epoch``), ``train_loss``,
        ``images_per_s``, ``val_loss``, ``val_auc``, ``val_accuracy``, ``lr``, ``seconds``."""

    def fit_ended(self, result: FitResult) -> None:
        """Training is over (every epoch ran, or early stopping); ``result`` is what fit returns."""


@dataclass
class TrainedStudent:
    """One training's outcome."""

    strategy: str
    fraction: float
    n_train: int
    best_epoch: int
    best_val_auc: float
    test_auc: float
    epochs_run: int
    run_id: str | None
    resumed_from_epoch: int | None
    # The fit's per-epoch rows (epoch, train_loss, val_loss, val_auc, ...): the training
    # history's plot data, left out of the train report.
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    @classmethod
    def from_fit(
        cls,
        strategy: str,
        fraction: float,
        n_train: int,
        result: FitResult,
        test_auc: float,
        run_id: str | None,
    ) -> TrainedStudent:
        """One training's outcome from its fit; ``run_id`` is its MLflow run (``None`` off
        rank 0)."""
        return cls(
            strategy=strategy,
            fraction=fraction,
            n_train=n_train,
            best_epoch=result.best_epoch,
            best_val_auc=result.best_val_auc,
            test_auc=test_auc,
            epochs_run=len(result.history),
            run_id=run_id,
            resumed_from_epoch=result.resumed_from_epoch,
            history=list(result.history),
        )

    def report_row(self) -> dict[str, Any]:
        """The outcome as the train report lists it (without the history)."""
        return {key: value for key, value in asdict(self).items() if key != "history"}


def primary_outcome(results: list[TrainedStudent], primary_run_id: str | None) -> TrainedStudent:
    """The outcome of the student saved to ``train.model_dir`` (the last one off rank 0)."""
    if primary_run_id is None:
        return results[-1]
    return next(r for r in results if r.run_id == primary_run_id)


def train_report(
    results: list[TrainedStudent],
    primary_run_id: str | None,
    parent_run_id: str | None,
    data_version: str,
) -> dict[str, Any]:
    """The content of the train report (:data:`tasks.reports.TRAIN`): the primary student's
    outcome and every run's. ``parent_run_id``: a comparison's parent MLflow run."""
    primary = primary_outcome(results, primary_run_id)
    return {
        "run_id": primary.run_id,
        "parent_run_id": parent_run_id,
        "dataset_version": data_version,
        **{k: v for k, v in primary.report_row().items() if k != "run_id"},
        "runs": [r.report_row() for r in results],
    }
