"""Training stage: fine-tune the teacher into a student and record the run in MLflow.

``medtransfer train`` / ``dvc repro train`` / the Prefect flow call :func:`run_train`. One
strategy gives one MLflow run. ``train.compare`` (a list of strategies) and
``train.label_fractions`` (shares of the training set) give one parent run with a nested child
run per (strategy, fraction), a comparison table and, for fractions, the data-efficiency plot.
The student of ``train.strategy`` on the full training set is saved to ``train.model_dir``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks import reports
from tasks.code_closure import code_version
from tasks.config import Params, TrainParams
from tasks.data.dataset import DatasetSource, ProcessedDataset, dataset_version, load_processed
from tasks.errors import MedtransferError
from tasks.evaluation.evaluation import Evaluation, evaluate_student
from tasks.model.student_io import STRATEGIES_SUBDIR, StudentSpec, save_student
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.training.adversarial import ADVERSARIAL_SUFFIX, pgd_perturbation, split_variant
from tasks.training.loop import FitConfig, Perturb, dist_env, fit
from tasks.training.recorders import LoggingRecorder, ProgressBarRecorder, TrainingRecorder

if TYPE_CHECKING:
    from torch import nn


def fit_config(config: TrainParams, seed: int, checkpoint_dir: Path, resume: bool) -> FitConfig:
    """The loop's settings from the ``train`` section."""
    return FitConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        patience=config.patience,
        class_weighting=config.class_weighting,
        num_workers=config.num_workers,
        seed=seed,
        device=config.device,
        amp=config.amp,
        channels_last=config.channels_last,
        checkpoint_dir=str(checkpoint_dir),
        resume=resume,
    )


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


def validate(config: TrainParams, dataset: ProcessedDataset) -> None:
    """Every configuration error, raised before any training starts."""
    from tasks.model.student import STRATEGIES, build_student, check_image_size

    for strategy in (config.strategy, *(config.compare or ())):
        if split_variant(strategy)[0] not in STRATEGIES:
            raise MedtransferError(
                f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}, each optionally "
                f"with {ADVERSARIAL_SUFFIX} for PGD adversarial training."
            )
    check_image_size(config.teacher, dataset.image_size)
    check_device(config.device)
    # Building the network checks the teacher name, its weights and unfreeze_blocks.
    build_student(
        config.teacher,
        split_variant(config.strategy)[0],
        num_classes=len(dataset.classes),
        unfreeze_blocks=config.unfreeze_blocks,
        pretrained=False,
        weights_path=config.weights_path,
    )
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
class _Session:
    """What every (strategy, fraction) training of one :func:`run_train` call shares."""

    params: Params
    config: TrainParams
    dataset: ProcessedDataset
    seed: int
    resume: bool
    data_version: str
    ingest_counts: dict[str, float]
    nested: bool  # several trainings: each is a child run of one parent run
    progress: bool  # a terminal progress bar over epochs
    recorders: tuple[TrainingRecorder, ...]  # the caller's, told of every fit


def run_train(
    params: Params,
    resume: bool = False,
    progress: bool = True,
    recorders: Sequence[TrainingRecorder] = (),
) -> dict:
    """The training stage; returns the content of the train report (:data:`tasks.reports.TRAIN`).

    Args:
        params: the configuration (params.yaml with overrides).
        resume: continue each training from its last epoch checkpoint when there is one.
        progress: show a progress bar over epochs on stderr (the log lines come either way).
        recorders: further listeners to every fit, on rank 0 (the Prefect flow passes its
            progress artifact); MLflow, logging and the progress bar are always there.
    """
    import mlflow

    from tasks.tracking import configure_mlflow

    config, seed = params.train, params.seed
    dataset = load_processed(params.data.processed_dir)
    source = dataset.source  # refuses a dataset that does not record its source
    validate(config, dataset)
    data_version = dataset_version(params.data.processed_dir)
    ingest_counts = _ingest_counts(source)
    strategies = list(config.compare or (config.strategy,))
    fractions = list(config.label_fractions or (1.0,))
    env = dist_env()
    if env.is_main:
        # Students of an earlier comparison must not be mistaken for this run's.
        shutil.rmtree(Path(config.model_dir) / STRATEGIES_SUBDIR, ignore_errors=True)

    logging = env.is_main
    if logging:
        configure_mlflow(params)
    nested = len(strategies) * len(fractions) > 1
    parent = _start_parent_run(config, strategies, data_version) if logging and nested else None
    session = _Session(
        params=params,
        config=config,
        dataset=dataset,
        seed=seed,
        resume=resume,
        data_version=data_version,
        ingest_counts=ingest_counts,
        nested=nested and logging,
        progress=progress,
        recorders=tuple(recorders),
    )
    try:
        if parent is not None:
            mlflow.log_params(logged_params(params, source))
            mlflow.set_tags(source.mlflow_tags())
        results, primary_run_id = _train_all(session, strategies, fractions)
        if parent is not None:
            _log_comparison(results, params.reports_dir)
    finally:
        if parent is not None:
            mlflow.end_run()

    report = _train_report(results, primary_run_id, parent, data_version)
    if env.is_main:
        reports.TRAIN.write(params.reports_dir, report)
    return report


def _start_parent_run(config: TrainParams, strategies: list[str], data_version: str):
    """Start the parent MLflow run of a comparison (its trainings are child runs); returns it."""
    import mlflow

    tags = {"dataset_version": data_version, "teacher": config.teacher, "stage": "train"}
    return mlflow.start_run(run_name=f"compare-{'-'.join(strategies)}", tags=tags)


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
    primary = (
        next(r for r in results if r.run_id == primary_run_id) if primary_run_id else results[-1]
    )
    return {
        "run_id": primary.run_id,
        "parent_run_id": parent.info.run_id if parent is not None else None,
        "dataset_version": data_version,
        **{k: v for k, v in asdict(primary).items() if k != "run_id"},
        "runs": [asdict(r) for r in results],
    }


def _train_one(
    session: _Session, strategy: str, fraction: float
) -> tuple[TrainedStudent, nn.Module, StudentSpec]:
    """Train one student (strategy, fraction) inside its own MLflow run (on rank 0).

    Returns:
        The outcome, the student with its selected weights (on the CPU, in eval mode), and the
        spec it is saved with.
    """
    import mlflow
    import torch

    from tasks.model.student import param_groups

    config, dataset, params = session.config, session.dataset, session.params
    torch.manual_seed(session.seed)  # the student's new head starts from the same weights
    base_strategy, adversarial = split_variant(strategy)
    adversarial = adversarial or config.adversarial == "pgd"
    train_idx = label_subset(dataset.labels, dataset.indices("train"), fraction, session.seed)
    model = _build_model(config, base_strategy, len(dataset.classes))
    train_set, val_set = _datasets(config, dataset, train_idx)
    checkpoint_dir = Path(config.checkpoint_dir) / _run_key(
        params, strategy, fraction, session.data_version
    )
    # The scratch control has no pretrained weights; every other student names its teacher file.
    teacher_sha256 = model.weights_sha256 or ""

    run = _start_run(session, strategy, fraction, adversarial) if dist_env().is_main else None
    try:
        if run is not None:
            _log_run_inputs(session, strategy, fraction, len(train_idx), teacher_sha256)
        result = fit(
            model,
            param_groups(model, config.lr, config.backbone_lr_factor),
            train_set,
            val_set,
            dataset.labels[train_idx],
            len(dataset.classes),
            fit_config(config, session.seed, checkpoint_dir, session.resume),
            recorders=_recorders(session, run, f"train {strategy}@{fraction:g}"),
            perturb=_perturbation(config) if adversarial else None,
        )
        model.load_state_dict(result.best_state)
        model.to("cpu").eval()
        evaluation = evaluate_student(model, dataset, params.eval.threshold)
        if run is not None:
            _log_evaluation_and_model(evaluation, model, dataset)
        spec = _student_spec(config, base_strategy, dataset, teacher_sha256)
        outcome = TrainedStudent(
            strategy=strategy,
            fraction=fraction,
            n_train=len(train_idx),
            best_epoch=result.best_epoch,
            best_val_auc=result.best_val_auc,
            test_auc=evaluation.test.auc,
            epochs_run=len(result.history),
            run_id=run.info.run_id if run is not None else None,
            resumed_from_epoch=result.resumed_from_epoch,
        )
    finally:
        if run is not None:
            mlflow.end_run()
    return outcome, model, spec


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


def _start_run(session: _Session, strategy: str, fraction: float, adversarial: bool):
    """Start this training's MLflow run (a child run when several are compared); returns it."""
    import mlflow

    config = session.config
    return mlflow.start_run(
        run_name=f"{strategy}@{fraction:g}" if session.nested else strategy,
        nested=session.nested,
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


def _log_run_inputs(
    session: _Session, strategy: str, fraction: float, n_train: int, teacher_sha256: str
) -> None:
    """Log what the active run trains on: every parameter, the teacher file, the dataset version
    and the ingestion counts."""
    import mlflow

    source = session.dataset.source
    mlflow.log_params(logged_params(session.params, source))
    mlflow.set_tags(source.mlflow_tags())
    mlflow.log_params(
        {
            "run.strategy": strategy,
            "run.label_fraction": fraction,
            "run.n_train": n_train,
            "teacher.weights_sha256": teacher_sha256 or "none (random init)",
            "dataset.version": session.data_version,
        }
    )
    mlflow.log_metrics({f"ingest_{k}": v for k, v in session.ingest_counts.items()})


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


def _log_evaluation_and_model(
    evaluation: Evaluation, model: nn.Module, dataset: ProcessedDataset
) -> None:
    """Log to the active run the selected student's evaluation and the student itself, as an
    MLflow PyTorch model with a signature and an input example of two validation images."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    # eval_*: the selected weights at the threshold chosen on val (the MLflow recorder logged
    # the per-epoch val_* curves, best_epoch and best_val_auc).
    mlflow.log_metrics({f"eval_{k}": v for k, v in evaluation.metrics().items() if np.isfinite(v)})
    example = dataset.images[dataset.indices("val")[:2]].astype(np.float32)[:, None] / 255.0
    with torch.no_grad():
        output = torch.softmax(model(torch.from_numpy(example)), 1).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        code_paths=[str(Path(__file__).resolve().parents[1])],
        pip_requirements=["torch", "monai", "numpy"],
    )


def _student_spec(
    config: TrainParams, base_strategy: str, dataset: ProcessedDataset, teacher_sha256: str
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


def _run_key(params: Params, strategy: str, fraction: float, data_version: str) -> str:
    """The checkpoint folder's name for one (strategy, fraction): resume never mixes runs.

    It covers the dataset's content (``data_version``, the processed folder's DVC hash), the
    train stage's code (:func:`tasks.code_closure.code_version`) and the parameters, so new
    data or new code starts a fresh training instead of resuming a finished checkpoint of
    the old one (the flow always resumes). Returns ``"<strategy>-<fraction>-<digest>"``.
    """
    sections = params.to_dict()
    relevant = {k: sections[k] for k in ("seed", "data", "train")}
    relevant["dataset_version"] = data_version
    relevant["code_version"] = code_version("train")
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()
    return f"{strategy}-{fraction:g}-{digest[:12]}"


def _ingest_counts(source: DatasetSource) -> dict[str, float]:
    """Ingestion's counts from the dataset's own record (the ingest report in reports_dir may
    describe a later ingestion into another folder)."""
    return {k: getattr(source, k) for k in ("files_seen", "ingested", "quarantined", "images")}


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
