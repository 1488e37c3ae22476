"""Training stage: fine-tune the teacher into a student and record the run in MLflow.

``medtransfer train`` / ``dvc repro train`` / the Prefect flow call :func:`run_train`. One
strategy gives one MLflow run. ``train.compare`` (a list of strategies) and
``train.label_fractions`` (shares of the training set) give one parent run with a nested child
run per (strategy, fraction), a comparison table and, for fractions, the data-efficiency plot.
The student of ``train.strategy`` on the full training set is saved to ``train.model_dir``.

Run records are honest (see :mod:`tasks.training.checkpoints`): a training that raises ends its
run ``FAILED``, one stopped by Ctrl-C or SIGTERM ``KILLED``; a run left ``RUNNING`` by a killed
process is closed ``KILLED`` the next time the same configuration trains; and resuming continues
the interrupted MLflow run itself, so its metrics cover every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tasks import reports
from tasks.code_closure import code_version
from tasks.config import Params, TrainParams
from tasks.data.dataset import DatasetSource, ProcessedDataset, dataset_version, load_processed
from tasks.errors import MedtransferError
from tasks.evaluation import plot_data
from tasks.evaluation.evaluation import Evaluation, evaluate_configured
from tasks.model.student_io import STRATEGIES_SUBDIR, StudentSpec, save_student
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.tracking import store_write
from tasks.training.adversarial import ADVERSARIAL_SUFFIX, pgd_perturbation, split_variant
from tasks.training.checkpoints import (
    RunRecord,
    changed_keys,
    checkpoint_fits,
    checkpoint_history,
    copy_checkpoint,
    latest_other_checkpoint,
    owner_alive,
    read_run_record,
    this_process,
    write_run_record,
)
from tasks.training.loop import CHECKPOINT_NAME, Perturb, dist_env, fit
from tasks.training.recorders import LoggingRecorder, ProgressBarRecorder
from tasks.training.types import FitConfig, FitResult, TrainedStudent, TrainingRecorder

if TYPE_CHECKING:
    from torch import nn

    from tasks.transfer.selection import TransferChoice

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


def validate(config: TrainParams, dataset: ProcessedDataset) -> None:
    """Every configuration error, raised before any training starts."""
    from tasks.model.student import STRATEGIES, build_student, check_image_size
    from tasks.model.teachers import resolve_weights

    for strategy in (config.strategy, *(config.compare or ())):
        if split_variant(strategy)[0] not in STRATEGIES:
            raise MedtransferError(
                f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}, each optionally "
                f"with {ADVERSARIAL_SUFFIX} for PGD adversarial training."
            )
    check_image_size(config.teacher, dataset.image_size)
    check_device(config.device)
    # Building the network checks the teacher name and unfreeze_blocks; resolving its weights
    # file that it exists (and its hash, when bundled), unless only the scratch control trains.
    build_student(
        config.teacher,
        split_variant(config.strategy)[0],
        num_classes=len(dataset.classes),
        unfreeze_blocks=config.unfreeze_blocks,
        pretrained=False,
    )
    if any(split_variant(s)[0] != "scratch" for s in (config.strategy, *(config.compare or ()))):
        resolve_weights(config.teacher, config.weights_path)
    if len(dataset.indices("train")) == 0 or len(dataset.indices("val")) == 0:
        raise MedtransferError(
            "The processed dataset has an empty train or val split; ingest more data."
        )


def check_device(device: str) -> None:
    """Refuse a CUDA device this host does not have, before anything is written: torch would
    fail only when the model moves, after the MLflow run and the student folder were touched."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise MedtransferError(
            f"train.device={device} but CUDA is not available on this host (torch "
            f"{torch.__version__}); use train.device=auto or cpu."
        )
    index = device.partition(":")[2]
    count = torch.cuda.device_count()
    if index and (not index.isdigit() or int(index) >= count):
        raise MedtransferError(
            f"train.device={device} but this host has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; use train.device=auto, cuda or cuda:N."
        )


@dataclass(frozen=True)
class _Plan:
    """How one (strategy, fraction) training starts; every plan is made before any training."""

    folder: Path  # this configuration's checkpoint folder
    configuration: dict[str, str]  # what the folder's name digests, key by key
    resume: bool  # fit continues the folder's checkpoint when there is one
    previous: RunRecord | None  # the folder's run record: its latest training's MLflow run
    seed_from: Path | None = None  # force: the other configuration's folder to continue
    continue_run_id: str | None = None  # rank 0: an interrupted MLflow run to continue
    linked_run_id: str | None = None  # rank 0: the run whose checkpoint a new run continues


@dataclass(frozen=True)
class _Session:
    """What every (strategy, fraction) training of one :func:`run_train` call shares."""

    params: Params
    config: TrainParams
    dataset: ProcessedDataset
    seed: int
    plans: Mapping[tuple[str, float], _Plan]  # by (strategy, fraction)
    data_version: str
    ingest_counts: dict[str, float]
    nested: bool  # several trainings: each is a child run of one parent run
    progress: bool  # a terminal progress bar over epochs
    recorders: tuple[TrainingRecorder, ...]  # the caller's, told of every fit
    decision: TransferChoice | None = None  # the evidence step's choice under auto


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
            (see :data:`ResumeMode`).
        progress: show a progress bar over epochs on stderr (the log lines come either way).
        recorders: further listeners to every fit, on rank 0 (the Prefect flow passes its
            progress artifact); MLflow, logging and the progress bar are always there.
    """
    from tasks.tracking import ended_honestly, sigterm_raises

    params, decision = _resolve_auto(params)
    strategies, fractions = _trainings(params.train)
    session, parent_id = _prepare_session(params, resume, progress, recorders)
    session = replace(session, decision=decision)
    with sigterm_raises():
        parent = _start_parent_run(session, strategies, parent_id) if session.nested else None
        with ended_honestly(parent is not None):
            if parent is not None:
                _log_dataset_and_params(params, session.dataset.source)
                _log_decision(decision)
            results, primary_run_id = _train_all(session, strategies, fractions)
            if parent is not None:
                _log_comparison(results, params.reports_dir)

    report = _train_report(results, primary_run_id, parent, session.data_version)
    if decision is not None:
        report["auto"] = decision.to_dict()
    if dist_env().is_main:
        primary = _primary(results, primary_run_id)
        rows = plot_data.history_rows(primary.history, primary.strategy, primary.fraction)
        plot_data.write_rows(params.reports_dir, plot_data.HISTORY, rows)
        reports.TRAIN.write(params.reports_dir, report)
    return report


def _resolve_auto(params: Params) -> tuple[Params, TransferChoice | None]:
    """``train.teacher: auto`` and ``train.strategy: auto``: run the evidence step and put its
    choice into the parameters (everything after sees, logs and checkpoints concrete values);
    returns them with the decision, or ``params`` and ``None`` when nothing is auto."""
    from tasks.transfer.selection import advise

    config = params.train
    if "auto" not in (config.teacher, config.strategy):
        return params, None
    decision = advise(params)
    overrides = [f"train.teacher={decision.teacher}"]
    if config.strategy == "auto":
        overrides += [
            f"train.strategy={decision.strategy}",
            f"train.unfreeze_blocks={decision.unfreeze_blocks}",
        ]
    logger.info(
        "auto (%d images, %.0f s, confidence %s): %s; %s",
        decision.n_images,
        decision.seconds,
        decision.confidence,
        ", ".join(overrides),
        "; ".join(decision.reasons),
    )
    return params.with_overrides(overrides), decision


@store_write()
def _log_decision(decision: TransferChoice | None) -> None:
    """The evidence step's choice on the active run: tags, the decision with every tap's
    evidence (JSON and a table) and the plot of probe score against depth."""
    import tempfile

    import mlflow

    from tasks.transfer.selection import plot_evidence

    if decision is None:
        return
    content = decision.to_dict()
    mlflow.set_tags(
        {
            "medtransfer.auto.teacher": decision.teacher,
            "medtransfer.auto.strategy": decision.strategy,
            "medtransfer.auto.unfreeze_blocks": str(decision.unfreeze_blocks),
            "medtransfer.auto.confidence": decision.confidence,
        }
    )
    mlflow.log_dict({k: v for k, v in content.items() if k != "evidence"}, "auto/decision.json")
    rows = content["evidence"]
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "auto/evidence.json")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "evidence.png"
        plot_evidence(decision, path)
        mlflow.log_artifact(str(path), "auto")


def _trainings(config: TrainParams) -> tuple[list[str], list[float]]:
    """The strategies and label fractions one ``run_train`` trains (every pair of them)."""
    return list(config.compare or (config.strategy,)), list(config.label_fractions or (1.0,))


def _prepare_session(
    params: Params,
    resume: bool | ResumeMode,
    progress: bool,
    recorders: Sequence[TrainingRecorder],
) -> tuple[_Session, str | None]:
    """Check everything and plan every training's checkpoint and MLflow run before any work.

    Returns:
        The session the trainings share, and the id of a comparison's parent run to continue
        (``None``: start a new one).

    Raises:
        MedtransferError: a configuration error, a dataset without its source record, or a
            refused ``--resume``.
    """
    from tasks.tracking import configure_mlflow

    config = params.train
    dataset = load_processed(params.data.processed_dir)
    source = dataset.source  # refuses a dataset that does not record its source
    validate(config, dataset)
    data_version = dataset_version(params.data.processed_dir)
    strategies, fractions = _trainings(config)
    mode = _resume_mode(resume)
    # Every training's checkpoint is planned first: a refused --resume stops before any work.
    plans = {
        (strategy, fraction): _plan_checkpoint(params, strategy, fraction, data_version, mode)
        for fraction in fractions
        for strategy in strategies
    }
    env = dist_env()
    if env.is_main:
        # Students of an earlier comparison must not be mistaken for this run's.
        shutil.rmtree(Path(config.model_dir) / STRATEGIES_SUBDIR, ignore_errors=True)
    parent_id = None
    if env.is_main:
        experiment_id = configure_mlflow(params)
        plans = {key: _plan_run(plan, experiment_id) for key, plan in plans.items()}
        parent_id = _parent_to_continue(plans, experiment_id)
    session = _Session(
        params=params,
        config=config,
        dataset=dataset,
        seed=params.seed,
        plans=plans,
        data_version=data_version,
        ingest_counts=_ingest_counts(source),
        nested=len(strategies) * len(fractions) > 1 and env.is_main,
        progress=progress,
        recorders=tuple(recorders),
    )
    return session, parent_id


@store_write()
def _start_parent_run(session: _Session, strategies: list[str], continue_run_id: str | None):
    """Start the parent MLflow run of a comparison (its trainings are child runs), or continue
    the interrupted one ``continue_run_id``; returns it."""
    import mlflow

    if continue_run_id is not None:
        return mlflow.start_run(run_id=continue_run_id)
    config = session.config
    tags = {"dataset_version": session.data_version, "teacher": config.teacher, "stage": "train"}
    name = f"compare-{'-'.join(strategies)} {_data_label(session)}"
    return mlflow.start_run(run_name=name, tags=tags)


def _data_label(session: _Session) -> str:
    """What a run name says of its data: the source's short name and the dataset version's
    first characters, e.g. ``breastmnist 3f2a1c``."""
    from tasks.tracking import dataset_label

    source = session.dataset.source
    return f"{dataset_label(source.location, source.kind)} {session.data_version[:6]}".strip()


def _resume_mode(resume: bool | ResumeMode) -> ResumeMode | None:
    """``run_train``'s ``resume`` as a mode; ``None``: start afresh."""
    if resume is False:
        return None
    if resume is True:
        return "matching"
    if resume not in ("matching", "strict", "force"):
        raise MedtransferError(f"resume={resume!r}: choose True, False, 'strict' or 'force'.")
    return resume


def _plan_checkpoint(
    params: Params, strategy: str, fraction: float, data_version: str, mode: ResumeMode | None
) -> _Plan:
    """Which checkpoint one training continues (on every rank: files only, no MLflow).

    Raises:
        MedtransferError: ``mode`` is ``"strict"`` and the latest checkpoint of this
            (strategy, fraction) was made with other parameters, data or code.
    """
    configuration = _configuration(params, data_version)
    root = Path(params.train.checkpoint_dir)
    folder = root / _run_key(configuration, strategy, fraction)
    plan = _Plan(folder, configuration, resume=mode is not None, previous=read_run_record(folder))
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


def _plan_run(plan: _Plan, experiment_id: str) -> _Plan:
    """Rank 0's half of a plan: close the stale run of this configuration, and choose the MLflow
    run to continue (an interrupted one) or to link to (the one whose checkpoint a new run
    continues)."""
    status = _close_stale_runs(plan.previous, experiment_id) if plan.previous else None
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


def _close_stale_runs(record: RunRecord, experiment_id: str) -> str | None:
    """End ``KILLED`` the run (and parent run) of ``record`` that a killed process left
    ``RUNNING``, saying so in a log line; returns the run's status after that.

    Raises:
        MedtransferError: the process that wrote ``record`` is still alive: it is training this
            configuration right now, into the same checkpoint folder.
    """
    from tasks.tracking import close_run, run_status

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


def _parent_to_continue(plans: Mapping[tuple[str, float], _Plan], experiment_id: str) -> str | None:
    """The interrupted parent run of a comparison whose child runs are being continued (its
    stale ``RUNNING`` state already closed by :func:`_close_stale_runs`)."""
    from tasks.tracking import run_status

    for plan in plans.values():
        parent = plan.previous.parent_run_id if plan.previous else None
        continued = plan.continue_run_id is not None and parent is not None
        if continued and run_status(parent, experiment_id) in ("KILLED", "FAILED"):
            return parent
    return None


@store_write()
def _log_dataset_and_params(params: Params, source: DatasetSource) -> None:
    """Log to the active run every parameter, the dataset's ``data.*`` values as ingested, and
    the dataset's own record of its source as tags."""
    import mlflow

    _log_new_params(logged_params(params, source))
    mlflow.set_tags(source.mlflow_tags())


def _log_new_params(flat: Mapping[str, Any]) -> None:
    """Log every parameter (``{"train.lr": "0.001", ...}``) to the active run. A continued
    run already has them: values that changed since (outside the checkpoint's key:
    evaluation, serving, ...) cannot be logged again in MLflow, so they are named in a tag and
    a log line instead."""
    import mlflow

    flat = {key: str(value) for key, value in flat.items()}
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
    mlflow.log_params({k: v for k, v in flat.items() if k not in logged})
    if changed:
        mlflow.set_tag("medtransfer.params_changed_on_resume", ", ".join(changed)[:5000])
        logger.warning("parameters changed since this run began (not re-logged): %s", changed)


def _train_all(
    session: _Session, strategies: list[str], fractions: list[float]
) -> tuple[list[TrainedStudent], str | None]:
    """Train every (strategy, fraction) and save the students of the largest fraction.

    Returns:
        Every training's outcome, and the MLflow run id of the primary student (the one saved
        to ``train.model_dir``; ``None`` off rank 0).
    """
    config, env = session.config, dist_env()
    results: list[TrainedStudent] = []
    primary_run_id = None
    for fraction in fractions:
        for strategy in strategies:
            outcome, model, spec = _train_one(session, strategy, fraction)
            results.append(outcome)
            is_primary = strategy == config.strategy or (
                config.compare and strategy == strategies[0] and config.strategy not in strategies
            )
            if fraction == max(fractions) and env.is_main:
                if len(strategies) > 1:
                    save_student(model, spec, Path(config.model_dir) / STRATEGIES_SUBDIR / strategy)
                if is_primary:
                    save_student(model, spec, config.model_dir)
                    primary_run_id = outcome.run_id
    return results, primary_run_id


def _train_report(
    results: list[TrainedStudent], primary_run_id: str | None, parent, data_version: str
) -> dict:
    """The content of the train report: the primary student's outcome and every run's.

    ``parent``: the comparison's parent MLflow run, or ``None`` for a single training.
    """
    primary = _primary(results, primary_run_id)
    return {
        "run_id": primary.run_id,
        "parent_run_id": parent.info.run_id if parent is not None else None,
        "dataset_version": data_version,
        **{k: v for k, v in primary.report_row().items() if k != "run_id"},
        "runs": [r.report_row() for r in results],
    }


def _primary(results: list[TrainedStudent], primary_run_id: str | None) -> TrainedStudent:
    """The outcome of the student saved to ``train.model_dir`` (the last one off rank 0)."""
    if primary_run_id is None:
        return results[-1]
    return next(r for r in results if r.run_id == primary_run_id)


def _train_one(
    session: _Session, strategy: str, fraction: float
) -> tuple[TrainedStudent, nn.Module, StudentSpec]:
    """Train one student (strategy, fraction) inside its own MLflow run (on rank 0).

    Returns:
        The outcome, the student with its selected weights (on the CPU, in eval mode), and the
        spec it is saved with.
    """
    import torch

    from tasks.tracking import ended_honestly, log_missing_epochs

    config, dataset, params = session.config, session.dataset, session.params
    plan = session.plans[(strategy, fraction)]
    torch.manual_seed(session.seed)  # the student's new head starts from the same weights
    base_strategy, adversarial = split_variant(strategy)
    adversarial = adversarial or config.adversarial == "pgd"
    train_idx = label_subset(dataset.labels, dataset.indices("train"), fraction, session.seed)
    model = _build_model(config, base_strategy, len(dataset.classes))
    train_set, val_set = _datasets(config, dataset, train_idx)
    if plan.seed_from is not None:
        _continue_other_checkpoint(plan, model)
    # The scratch control has no pretrained weights; every other student names its teacher file.
    teacher_sha256 = model.weights_sha256 or ""

    run = (
        _start_run(session, strategy, fraction, adversarial, plan, len(train_idx))
        if dist_env().is_main
        else None
    )
    with ended_honestly(run is not None):
        if run is not None:
            _record_run(run, plan)
            _log_run_inputs(session, strategy, fraction, len(train_idx), teacher_sha256)
            if plan.resume:
                log_missing_epochs(run.info.run_id, checkpoint_history(plan.folder))
        result = _fit_student(
            session,
            model,
            base_strategy,
            train_idx,
            (train_set, val_set),
            FitConfig.from_train(config, session.seed, plan.folder, plan.resume),
            recorders=_recorders(session, run, f"train {strategy}@{fraction:g}"),
            perturb=_perturbation(config) if adversarial else None,
        )
        model.to("cpu").eval()
        evaluation = evaluate_configured(model, dataset, params.eval, session.seed)
        if run is not None:
            _log_evaluation_and_model(evaluation, model, session)
    spec = _student_spec(config, base_strategy, dataset, teacher_sha256, evaluation.temperature)
    return _outcome(strategy, fraction, len(train_idx), result, evaluation, run), model, spec


def _fit_student(
    session: _Session,
    model: nn.Module,
    base_strategy: str,
    train_idx: np.ndarray,
    sets: tuple[ImageDataset, ImageDataset],
    loop: FitConfig,
    recorders: list[TrainingRecorder],
    perturb: Perturb | None,
) -> FitResult:
    """Fit ``model`` and load its selected weights into it.

    A frozen trunk that sees no augmentation (``linear_probe`` with every ``train.augment``
    value off, no adversarial training) trains its head on features computed once
    (:mod:`tasks.training.features`); ``lp_ft`` first fits the head to the frozen features
    (the LP stage), then fine-tunes everything.
    """
    from tasks.model.student import param_groups
    from tasks.training.features import HeadOnly, feature_datasets, fit_linear_head
    from tasks.training.loop import class_weights, resolve_device

    config, dataset = session.config, session.dataset
    labels = dataset.labels[np.sort(train_idx)]
    n_classes = len(dataset.classes)
    cached = base_strategy == "linear_probe" and not _augments(config) and perturb is None
    if cached or base_strategy == "lp_ft":
        device = resolve_device(loop.device, dist_env())
        train = (dataset.images[np.sort(train_idx)], labels)
        features = feature_datasets(model.to(device), train, dataset.subset("val"), device)
    if base_strategy == "lp_ft":
        weights = class_weights(labels, n_classes, config.class_weighting)
        loss = fit_linear_head(
            model.head, features[0].tensors[0], labels, weights, loop.weight_decay
        )
        logger.info("LP-FT: head fitted to the frozen features (loss %.4f), now fine-tuning", loss)
    if cached:
        head = HeadOnly(model)
        groups = [{"name": "head", "params": list(head.head.parameters()), "lr": config.lr}]
        loop = replace(loop, channels_last=False)  # (B, D) features have no memory format
        result = fit(head, groups, *features, labels, n_classes, loop, recorders)
        head.load_state_dict(result.best_state)
        return result
    groups = param_groups(model, config.lr, config.backbone_lr_factor)
    result = fit(model, groups, *sets, labels, n_classes, loop, recorders, perturb)
    model.load_state_dict(result.best_state)
    return result


def _augments(config: TrainParams) -> bool:
    """Whether any ``train.augment`` transform is on."""
    return any(bool(value) for value in asdict(config.augment).values())


def _outcome(
    strategy: str, fraction: float, n_train: int, result: FitResult, evaluation: Evaluation, run
) -> TrainedStudent:
    """One training's outcome; ``run`` is its MLflow run, ``None`` off rank 0."""
    return TrainedStudent(
        strategy=strategy,
        fraction=fraction,
        n_train=n_train,
        best_epoch=result.best_epoch,
        best_val_auc=result.best_val_auc,
        test_auc=evaluation.test.auc,
        epochs_run=len(result.history),
        run_id=run.info.run_id if run is not None else None,
        resumed_from_epoch=result.resumed_from_epoch,
        history=list(result.history),
    )


def _continue_other_checkpoint(plan: _Plan, model: nn.Module) -> None:
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


def _record_run(run, plan: _Plan) -> None:
    """Write the run record beside the checkpoint as soon as the run exists: if this process is
    killed, the next run of this configuration finds the run to close and continue."""
    import mlflow

    parent = run.data.tags.get("mlflow.parentRunId")
    write_run_record(plan.folder, this_process(run.info.run_id, parent, plan.configuration))
    if plan.linked_run_id is not None:
        mlflow.set_tag("medtransfer.continues_run", plan.linked_run_id)


def _build_model(config: TrainParams, base_strategy: str, num_classes: int) -> nn.Module:
    """The student network for ``base_strategy`` (without ``+pgd``), teacher weights loaded
    unless it is the scratch control."""
    from tasks.model.student import build_student

    return build_student(
        config.teacher,
        base_strategy,
        num_classes=num_classes,
        unfreeze_blocks=config.unfreeze_blocks,
        pretrained=base_strategy != "scratch",
        weights_path=config.weights_path,
        dropout=config.dropout,
    )


def _datasets(
    config: TrainParams, dataset: ProcessedDataset, train_idx: np.ndarray
) -> tuple[ImageDataset, ImageDataset]:
    """The augmented training set of ``train_idx`` and the plain validation set."""
    size = dataset.image_size
    train_set = ImageDataset(
        dataset.images[np.sort(train_idx)],
        dataset.labels[np.sort(train_idx)],
        train_transform(config.augment, size),
    )
    val_images, val_labels = dataset.subset("val")
    return train_set, ImageDataset(val_images, val_labels, to_tensor_transform())


def _perturbation(config: TrainParams) -> Perturb:
    """The PGD training hook at ``adversarial_eps_255`` / 255 (pixels are in [0, 1])."""
    return pgd_perturbation(config.adversarial_eps_255 / 255.0, config.adversarial_steps)


@store_write()
def _start_run(
    session: _Session, strategy: str, fraction: float, adversarial: bool, plan: _Plan, n_train: int
):
    """Start this training's MLflow run (a child run when several are compared), or continue
    the interrupted one the plan names; returns it. The run is named so that runs can be told
    apart in the list, ``partial@0.5 breastmnist 3f2a1c n=273``, and samples system metrics."""
    import mlflow

    config = session.config
    if plan.continue_run_id is not None:
        parent = mlflow.active_run()
        tags = {"medtransfer.continued": "true"}
        if session.nested and parent is not None:
            tags["mlflow.parentRunId"] = parent.info.run_id
        logger.info("continuing MLflow run %s", plan.continue_run_id)
        return mlflow.start_run(
            run_id=plan.continue_run_id, nested=session.nested, tags=tags, log_system_metrics=True
        )
    which = f"{strategy}@{fraction:g}" if session.nested else strategy
    return mlflow.start_run(
        run_name=f"{which} {_data_label(session)} n={n_train}",
        nested=session.nested,
        log_system_metrics=True,
        tags={
            "dataset_version": session.data_version,
            "teacher": config.teacher,
            "strategy": split_variant(strategy)[0],
            "variant": strategy,
            "adversarial_training": f"pgd@{config.adversarial_eps_255:g}/255"
            if adversarial
            else "none",
            "label_fraction": str(fraction),
            "stage": "train",
        },
    )


@store_write()
def _log_run_inputs(
    session: _Session, strategy: str, fraction: float, n_train: int, teacher_sha256: str
) -> None:
    """Log what the active run trains on: every parameter, the teacher file, the dataset (as an
    MLflow dataset input, with its version as digest) and the ingestion counts."""
    import mlflow

    from tasks.tracking import mlflow_dataset

    _log_dataset_and_params(session.params, session.dataset.source)
    mlflow.log_input(mlflow_dataset(session.dataset, session.data_version), context="training")
    _log_new_params(
        {
            "run.strategy": strategy,
            "run.label_fraction": fraction,
            "run.n_train": n_train,
            "teacher.weights_sha256": teacher_sha256 or "none (random init)",
            "dataset.version": session.data_version,
        }
    )
    _log_decision(session.decision)
    logged = mlflow.active_run().data.metrics  # a continued run has them already
    mlflow.log_metrics(
        {f"ingest_{k}": v for k, v in session.ingest_counts.items() if f"ingest_{k}" not in logged}
    )


def logged_params(params: Params, source: DatasetSource) -> dict[str, str]:
    """Every parameter as MLflow logs it, except that the ``data.*`` values describing the
    dataset are the ones it was ingested with (from its own record), plus ``dataset.*``: a
    run started with another ``-S data.source`` still names the data it trained on."""
    from tasks.tracking import flatten_params

    return {**flatten_params(params.to_dict()), **source.mlflow_params()}


def _recorders(session: _Session, run, bar_label: str) -> list[TrainingRecorder]:
    """Who hears one fit's events: MLflow (when ``run`` is this rank's run), the log, the
    progress bar, then the caller's recorders."""
    from tasks.tracking import MlflowRecorder

    recorders: list[TrainingRecorder] = [MlflowRecorder(run.info.run_id)] if run else []
    recorders.append(LoggingRecorder())
    # One bar per training: several in a comparison, so each says which it is.
    recorders.append(
        ProgressBarRecorder(session.progress, bar_label if session.nested else "train")
    )
    return recorders + list(session.recorders)


@store_write()
def _log_evaluation_and_model(evaluation: Evaluation, model: nn.Module, session: _Session) -> None:
    """Log to the active run the selected student, as an MLflow PyTorch model with a signature
    and an input example of two validation images, then its evaluation, linked to that model
    and to the dataset so that the model's page shows them."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from tasks.tracking import MODEL_NAME, mlflow_dataset, model_requirements

    dataset = session.dataset
    example = dataset.images[dataset.indices("val")[:2]].astype(np.float32)[:, None] / 255.0
    with torch.no_grad():
        output = torch.softmax(model(torch.from_numpy(example)) / evaluation.temperature, 1).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        signature=infer_signature(example, output),
        input_example=example,
        # torch.export's program: loading it needs neither pickle nor this project's code
        # (so no code_paths), and the format does not change with MLflow's default.
        serialization_format="pt2",
        pip_requirements=model_requirements(),
    )
    # eval_*: the selected weights at the threshold chosen on val (the MLflow recorder logged
    # the per-epoch val_* curves, best_epoch and best_val_auc).
    mlflow.log_metrics(
        {f"eval_{k}": v for k, v in evaluation.metrics().items() if np.isfinite(v)},
        model_id=info.model_id,
        dataset=mlflow_dataset(dataset, session.data_version),
    )


def _student_spec(
    config: TrainParams,
    base_strategy: str,
    dataset: ProcessedDataset,
    teacher_sha256: str,
    temperature: float,
) -> StudentSpec:
    """What ``save_student`` writes beside the weights, to rebuild the network for serving."""
    return StudentSpec(
        teacher=config.teacher,
        strategy=base_strategy,
        unfreeze_blocks=config.unfreeze_blocks,
        num_classes=len(dataset.classes),
        dropout=config.dropout,
        image_size=dataset.image_size,
        classes=tuple(dataset.classes),
        teacher_weights_sha256=teacher_sha256,
        temperature=temperature,
    )


def label_subset(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, label-stratified share of ``indices`` (at least 2 per class), sorted."""
    if fraction >= 1.0:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        count = max(2, round(len(members) * fraction))
        chosen.append(rng.permutation(members)[: min(count, len(members))])
    return np.sort(np.concatenate(chosen))


def _configuration(params: Params, data_version: str) -> dict[str, str]:
    """What a checkpoint was trained with, flat (``train.lr``, ...): the ``seed``, ``data`` and
    ``train`` parameters, the dataset's content (``dataset_version``, the processed folder's DVC
    hash) and the train stage's code (``code_version``, :func:`tasks.code_closure.code_version`).
    """
    from tasks.tracking import flatten_params

    sections = params.to_dict()
    relevant = {k: sections[k] for k in ("seed", "data", "train")}
    relevant["dataset_version"] = data_version
    relevant["code_version"] = code_version("train")
    return flatten_params(relevant)


def _run_key(configuration: dict[str, str], strategy: str, fraction: float) -> str:
    """The checkpoint folder's name for one (strategy, fraction): resume never mixes runs.

    A digest of the whole :func:`_configuration`, so new data, code or parameters start a fresh
    training instead of resuming a finished checkpoint of the old ones (the flow always
    resumes). Returns ``"<strategy>-<fraction>-<digest>"``.
    """
    digest = hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()
    return f"{strategy}-{fraction:g}-{digest[:12]}"


def _ingest_counts(source: DatasetSource) -> dict[str, float]:
    """Ingestion's counts from the dataset's own record (the ingest report in reports_dir may
    describe a later ingestion into another folder)."""
    return {k: getattr(source, k) for k in ("files_seen", "ingested", "quarantined", "images")}


@store_write()
def _log_comparison(results: list[TrainedStudent], reports_dir: str) -> None:
    """Comparison table on the parent run, plus the data-efficiency plot for several fractions."""
    import mlflow

    from tasks.evaluation.plots import plot_data_efficiency

    rows = [asdict(r) for r in results]
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "comparison.json")
    for r in results:
        mlflow.log_metric(
            f"test_auc.{r.strategy.replace('+', '_')}.fraction_{r.fraction:g}", r.test_auc
        )
    if len({r.fraction for r in results}) > 1:
        curves: dict[str, list[tuple[int, float]]] = {}
        for r in results:
            curves.setdefault(r.strategy, []).append((r.n_train, r.test_auc))
        path = plot_data_efficiency(curves, reports.plot_path(reports_dir, "data_efficiency.png"))
        mlflow.log_artifact(str(path))
