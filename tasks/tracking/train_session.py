"""One training stage call's shared plan (:class:`TrainSession`): the dataset checked, every
(strategy, fraction) training's checkpoint and MLflow run planned before any work starts.

:func:`prepare_session` is what :func:`tasks.stages.train.run_train` does first: a refused
``--resume``, a configuration error or a dataset without its source record stops it here, before
a run is opened or a student is removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params, TrainParams
from tasks.data.channels import check_training_channels
from tasks.data.dataset import dataset_version, load_processed
from tasks.model.student_io import STRATEGIES_SUBDIR
from tasks.tracking import train_run
from tasks.tracking.configure import configure_mlflow
from tasks.tracking.resume import parent_to_continue, plan_run
from tasks.training import strategies
from tasks.training.loop import dist_env
from tasks.training.resume import ResumeMode, ResumePlan, plan_checkpoint, resume_mode
from tasks.training.types import TrainingRecorder
from tasks.transfer.selection import TransferChoice


@dataclass(frozen=True)
class TrainSession:
    """What every (strategy, fraction) training of one :func:`run_train` call shares."""

    run: train_run.TrainRunContext  # the configuration, dataset and what every run logs alike
    plans: Mapping[tuple[str, float], ResumePlan]  # by (strategy, fraction)
    progress: bool  # a terminal progress bar over epochs
    recorders: tuple[TrainingRecorder, ...]  # the caller's, told of every fit


def trainings(config: TrainParams) -> tuple[list[str], list[float]]:
    """The strategies and label fractions one ``run_train`` trains (every pair of them)."""
    return list(config.compare or (config.strategy,)), list(config.label_fractions or (1.0,))


def prepare_session(
    params: Params,
    resume: bool | ResumeMode,
    progress: bool,
    recorders: Sequence[TrainingRecorder],
    choice: TransferChoice | None,
) -> tuple[TrainSession, str | None]:
    """Check everything and plan every training's checkpoint and MLflow run before any work.

    Returns:
        The session the trainings share, and the id of a comparison's parent run to continue
        (``None``: start a new one).

    Raises:
        MedtransferError: a configuration error, a dataset without its source record, or a
            refused ``--resume``.
    """
    dataset = load_processed(params.data.processed_dir)
    dataset.source  # noqa: B018 (refuses a dataset that does not record its source)
    check_training_channels(params.data.channels, dataset.channels)
    strategies.validate(params.train, dataset)
    data_version = dataset_version(params.data.processed_dir)
    strategy_list, fractions = trainings(params.train)
    mode = resume_mode(resume)
    # Every training's checkpoint is planned first: a refused --resume stops before any work.
    plans = {
        (strategy, fraction): plan_checkpoint(params, strategy, fraction, data_version, mode)
        for fraction in fractions
        for strategy in strategy_list
    }
    parent_id, env = None, dist_env()
    if env.is_main:
        # Students of an earlier comparison must not be mistaken for this run's.
        shutil.rmtree(Path(params.train.model_dir) / STRATEGIES_SUBDIR, ignore_errors=True)
        experiment_id = configure_mlflow(params)
        plans = {key: plan_run(plan, experiment_id) for key, plan in plans.items()}
        parent_id = parent_to_continue(plans, experiment_id)
    nested = len(strategy_list) * len(fractions) > 1 and env.is_main
    run = train_run.TrainRunContext.of(params, dataset, data_version, nested, choice)
    return TrainSession(run, plans, progress, tuple(recorders)), parent_id
