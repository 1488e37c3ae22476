"""Training stage: fine-tune the teacher into a student and record the run in MLflow.

``medtransfer train`` / ``dvc repro train`` / the Prefect flow call :func:`run_train`. One
strategy gives one MLflow run. ``train.compare`` (a list of strategies) and
``train.label_fractions`` (shares of the training set) give one parent run with a nested child
run per (strategy, fraction), a comparison table and, for fractions, the data-efficiency plot.
The student of ``train.strategy`` on the full training set is saved to ``train.model_dir``.

Where the work lives: the strategies and the fit in :mod:`tasks.training.strategies`, resume
planning in :mod:`tasks.training.resume` (its MLflow half in :mod:`tasks.tracking.resume`), the
MLflow runs in :mod:`tasks.tracking.train_run`, the session planned before any work in
:mod:`tasks.tracking.train_session`, the ``auto`` choice (evidence, candidates, pilot
fine-tunes judged on validation AUC and inherited exposure) in :mod:`tasks.transfer.auto`. Run records are honest (see
:mod:`tasks.training.checkpoints`): a training that raises ends its run ``FAILED``, one stopped
by Ctrl-C or SIGTERM ``KILLED``; a run left ``RUNNING`` by a killed process is closed
``KILLED`` the next time the same configuration trains; and resuming continues the interrupted
MLflow run itself, so its metrics cover every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tasks import reports
from tasks.config import Params
from tasks.evaluation import plot_data
from tasks.evaluation.evaluation import evaluate_configured
from tasks.model.student_io import STRATEGIES_SUBDIR, StudentSpec, save_student
from tasks.signals import sigterm_raises
from tasks.stages.preflight import check_stage_outputs
from tasks.tracking import train_run
from tasks.tracking.recorder import MlflowRecorder
from tasks.tracking.runs import ended_honestly
from tasks.tracking.train_session import TrainSession, prepare_session, trainings
from tasks.training import strategies
from tasks.training.loop import dist_env
from tasks.training.recorders import LoggingRecorder, ProgressBarRecorder
from tasks.training.resume import ResumeMode, continue_other_checkpoint
from tasks.training.types import (
    FitConfig,
    TrainedStudent,
    TrainingRecorder,
    primary_outcome,
    train_report,
)
from tasks.transfer.auto import apply_auto, decision_table


def run_train(
    params: Params,
    resume: bool | ResumeMode = False,
    progress: bool = True,
    recorders: Sequence[TrainingRecorder] = (),
) -> dict:
    """The training stage; returns the content of the train report (:data:`tasks.reports.TRAIN`).

    Args:
        params: the configuration (params.yaml with overrides).
        resume: ``False``: train from scratch. ``True`` (``"matching"``): continue each
            training from this configuration's last epoch checkpoint when there is one.
            ``"strict"``: the same, but a checkpoint of changed parameters, data or code is a
            :class:`MedtransferError` naming the changed keys; ``"force"``: continue that one
            (see :data:`tasks.training.resume.ResumeMode`).
        progress: show a progress bar over epochs on stderr (the log lines come either way).
        recorders: further listeners to every fit, on rank 0 (the Prefect flow passes its
            progress artifact); MLflow, logging and the progress bar are always there.
    """
    check_stage_outputs("train", params)
    params, choice = apply_auto(params, progress)
    strategy_list, fractions = trainings(params.train)
    session, parent_id = prepare_session(params, resume, progress, recorders, choice)
    run = session.run
    with sigterm_raises():
        parent = train_run.start_parent_run(run, strategy_list, parent_id) if run.nested else None
        with ended_honestly(parent is not None):
            if parent is not None:
                train_run.log_dataset_and_params(params, run.dataset.source)
                train_run.log_transfer_choice(choice)
            results, primary_run_id = _train_all(session, strategy_list, fractions)
            if parent is not None:
                train_run.log_comparison(results, params.reports_dir)

    parent_run_id = parent.info.run_id if parent is not None else None
    report = train_report(results, primary_run_id, parent_run_id, run.data_version)
    if choice is not None:
        report["auto"] = choice.to_dict()
        report["auto"]["decision_table"] = decision_table(choice) if choice.pilots else []
    if dist_env().is_main:
        primary = primary_outcome(results, primary_run_id)
        rows = plot_data.history_rows(primary.history, primary.strategy, primary.fraction)
        plot_data.write_rows(params.reports_dir, plot_data.HISTORY, rows)
        reports.TRAIN.write(params.reports_dir, report)
    return report


def _train_all(
    session: TrainSession, strategy_list: list[str], fractions: list[float]
) -> tuple[list[TrainedStudent], str | None]:
    """Train every (strategy, fraction) and save the students of the largest fraction.

    Returns:
        Every training's outcome, and the MLflow run id of the primary student (the one saved
        to ``train.model_dir``; ``None`` off rank 0).
    """
    config, env = session.run.params.train, dist_env()
    results: list[TrainedStudent] = []
    primary_run_id = None
    for fraction in fractions:
        for strategy in strategy_list:
            outcome, model, spec = _train_one(session, strategy, fraction)
            results.append(outcome)
            is_primary = strategy == config.strategy or (
                config.compare
                and strategy == strategy_list[0]
                and config.strategy not in strategy_list
            )
            if fraction == max(fractions) and env.is_main:
                if len(strategy_list) > 1:
                    save_student(model, spec, Path(config.model_dir) / STRATEGIES_SUBDIR / strategy)
                if is_primary:
                    save_student(model, spec, config.model_dir)
                    primary_run_id = outcome.run_id
    return results, primary_run_id


def _train_one(
    session: TrainSession, strategy: str, fraction: float
) -> tuple[TrainedStudent, nn.Module, StudentSpec]:
    """Train one student (strategy, fraction) inside its own MLflow run (on rank 0).

    Returns:
        The outcome, the student with its selected weights (on the CPU, in eval mode), and the
        spec it is saved with.
    """
    context, plan = session.run, session.plans[(strategy, fraction)]
    params, dataset = context.params, context.dataset
    torch.manual_seed(params.seed)  # the student's new head starts from the same weights
    train_idx = strategies.label_subset(
        dataset.labels, dataset.indices("train"), fraction, params.seed
    )
    model = strategies.build_model(params.train, strategy, len(dataset.classes), dataset.channels)
    if plan.seed_from is not None:
        continue_other_checkpoint(plan, model)
    # The scratch control has no pretrained weights; every other student names its teacher file.
    teacher_sha256 = model.weights_sha256 or ""
    is_main = dist_env().is_main
    n_train = len(train_idx)
    with train_run.training_run(
        context, plan, strategy, fraction, n_train, teacher_sha256, is_main
    ) as run:
        result = strategies.fit_student(
            model,
            dataset,
            params.train,
            FitConfig.from_train(params.train, params.seed, plan.folder, plan.resume),
            _recorders(session, run, f"train {strategy}@{fraction:g}"),
            strategy=strategy,
            train_idx=train_idx,
        )
        model.to("cpu").eval()
        evaluation = evaluate_configured(model, dataset, params.eval, params.seed)
        if run is not None:
            train_run.log_evaluation_and_model(evaluation, model, context)
    spec = strategies.student_spec(
        params.train, strategy, dataset, teacher_sha256, evaluation.temperature
    )
    run_id = run.info.run_id if run is not None else None
    outcome = TrainedStudent.from_fit(
        strategy, fraction, n_train, result, evaluation.test.auc, run_id
    )
    return outcome, model, spec


def _recorders(session: TrainSession, run, bar_label: str) -> list[TrainingRecorder]:
    """Who hears one fit's events: MLflow (when ``run`` is this rank's run), the log, the
    progress bar, then the caller's recorders."""
    recorders: list[TrainingRecorder] = [MlflowRecorder(run.info.run_id)] if run else []
    recorders.append(LoggingRecorder())
    # One bar per training: several in a comparison, so each says which it is.
    nested = session.run.nested
    recorders.append(ProgressBarRecorder(session.progress, bar_label if nested else "train"))
    return recorders + list(session.recorders)
