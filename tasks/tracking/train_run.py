"""The train stage's MLflow runs: one run per training (a child of one parent run when several
are compared), what each logs (parameters, dataset, ingestion counts, the transfer choice, the
student with its signature and its evaluation) and the parent's comparison table.

Every write is a :func:`tasks.signals.sigterm_deferred` write: a SIGTERM arriving inside is
raised right after it, so the run can still be ended ``KILLED``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import infer_signature
from torch import nn

from tasks import reports
from tasks.config import Params, flatten_params
from tasks.data.dataset import DatasetSource, ProcessedDataset
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.evaluation.evaluation import Evaluation
from tasks.evaluation.plots import plot_data_efficiency
from tasks.model.label_kind import kind_named
from tasks.model.predict import run_model
from tasks.signals import sigterm_deferred
from tasks.tracking.configure import (
    MODEL_NAME,
    mlflow_dataset,
    model_requirements,
)
from tasks.tracking.recorder import log_missing_epochs
from tasks.tracking.resume import record_run
from tasks.tracking.runs import ended_honestly
from tasks.training.adversarial import split_variant
from tasks.training.checkpoints import checkpoint_history
from tasks.training.resume import ResumePlan
from tasks.training.strategies import is_adversarial
from tasks.training.types import TrainedStudent
from tasks.transfer.auto import decision_rows, decision_table, plot_decision
from tasks.transfer.evidence_report import plot_evidence
from tasks.transfer.selection import TransferChoice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRunContext:
    """What every training run of one ``run_train`` call logs alike."""

    params: Params  # the configuration, auto choices already applied
    dataset: ProcessedDataset
    data_version: str  # the processed folder's DVC hash
    ingest_counts: dict[str, float]  # from the dataset's own record of its ingestion
    nested: bool  # several trainings: each is a child run of one parent run
    choice: TransferChoice | None = None  # the evidence step's choice under auto

    @classmethod
    def of(
        cls,
        params: Params,
        dataset: ProcessedDataset,
        data_version: str,
        nested: bool,
        choice: TransferChoice | None,
    ) -> TrainRunContext:
        """The context, with ingestion's counts read from the dataset's own record (the ingest
        report in reports_dir may describe a later ingestion into another folder)."""
        source = dataset.source
        counts = {
            k: getattr(source, k) for k in ("files_seen", "ingested", "quarantined", "images")
        }
        return cls(params, dataset, data_version, counts, nested, choice)

    def data_label(self) -> str:
        """What a run name says of its data: the dataset's name (``data.name``, never a path)
        and the dataset version's first characters, e.g. ``site-a 3f2a1c``."""
        return f"{self.dataset.source.name} {self.data_version[:6]}".strip()


@sigterm_deferred()
def start_run(
    context: TrainRunContext,
    strategy: str,
    fraction: float,
    adversarial: bool,
    n_train: int,
    continue_run_id: str | None,
):
    """Start this training's MLflow run (a child run when several are compared), or continue
    the interrupted run ``continue_run_id``; returns it. The run is named so that runs can be
    told apart in the list, ``partial@0.5 breastmnist 3f2a1c n=273``, and samples system
    metrics."""
    config = context.params.train
    if continue_run_id is not None:
        parent = mlflow.active_run()
        tags = {"medtransfer.continued": "true"}
        if context.nested and parent is not None:
            tags["mlflow.parentRunId"] = parent.info.run_id
        logger.info("continuing MLflow run %s", continue_run_id)
        return mlflow.start_run(
            run_id=continue_run_id, nested=context.nested, tags=tags, log_system_metrics=True
        )
    which = f"{strategy}@{fraction:g}" if context.nested else strategy
    return mlflow.start_run(
        run_name=f"{which} {context.data_label()} n={n_train}",
        nested=context.nested,
        log_system_metrics=True,
        tags={
            "dataset_version": context.data_version,
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


@contextmanager
def training_run(
    context: TrainRunContext,
    plan: ResumePlan,
    strategy: str,
    fraction: float,
    n_train: int,
    teacher_sha256: str,
    active: bool,
) -> Iterator[Any]:
    """One training's MLflow run around the ``with`` block: started (or the interrupted one
    continued, as ``plan`` says), recorded beside the checkpoint, given its inputs and the
    epochs it lacks, and ended honestly (:func:`tasks.tracking.runs.ended_honestly`). Yields
    the run; ``active=False`` (off rank 0): no run, yields ``None``."""
    adversarial = is_adversarial(strategy, context.params.train)
    run = (
        start_run(context, strategy, fraction, adversarial, n_train, plan.continue_run_id)
        if active
        else None
    )
    with ended_honestly(run is not None):
        if run is not None:
            record_run(run, plan)
            log_run_inputs(context, strategy, fraction, n_train, teacher_sha256)
            if plan.resume:
                log_missing_epochs(run.info.run_id, checkpoint_history(plan.folder))
        yield run


@sigterm_deferred()
def start_parent_run(context: TrainRunContext, strategies: list[str], continue_run_id: str | None):
    """Start the parent MLflow run of a comparison (its trainings are child runs), or continue
    the interrupted one ``continue_run_id``; returns it."""
    if continue_run_id is not None:
        return mlflow.start_run(run_id=continue_run_id)
    teacher = context.params.train.teacher
    tags = {"dataset_version": context.data_version, "teacher": teacher, "stage": "train"}
    name = f"compare-{'-'.join(strategies)} {context.data_label()}"
    return mlflow.start_run(run_name=name, tags=tags)


def logged_params(params: Params, source: DatasetSource) -> dict[str, str]:
    """Every parameter as MLflow logs it, except that the ``data.*`` values describing the
    dataset are the ones it was ingested with (from its own record), plus ``dataset.*``: a
    run started with another ``-S data.source`` still names the data it trained on."""
    return {**flatten_params(params.to_dict()), **source.mlflow_params()}


@sigterm_deferred()
def log_dataset_and_params(params: Params, source: DatasetSource) -> None:
    """Log to the active run every parameter, the dataset's ``data.*`` values as ingested, and
    the dataset's own record of its source as tags."""
    log_new_params(logged_params(params, source))
    mlflow.set_tags(source.mlflow_tags())


def log_new_params(flat: Mapping[str, Any]) -> None:
    """Log every parameter (``{"train.lr": "0.001", ...}``) to the active run. A continued
    run already has them: values that changed since (outside the checkpoint's key:
    evaluation, serving, ...) cannot be logged again in MLflow, so they are named in a tag and
    a log line instead."""
    flat = {key: str(value) for key, value in flat.items()}
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
    mlflow.log_params({k: v for k, v in flat.items() if k not in logged})
    if changed:
        mlflow.set_tag("medtransfer.params_changed_on_resume", ", ".join(changed)[:5000])
        logger.warning("parameters changed since this run began (not re-logged): %s", changed)


@sigterm_deferred()
def log_run_inputs(
    context: TrainRunContext, strategy: str, fraction: float, n_train: int, teacher_sha256: str
) -> None:
    """Log what the active run trains on: every parameter, the teacher file, the dataset (as an
    MLflow dataset input, with its version as digest) and the ingestion counts."""
    log_dataset_and_params(context.params, context.dataset.source)
    mlflow.log_input(mlflow_dataset(context.dataset, context.data_version), context="training")
    log_new_params(
        {
            "run.strategy": strategy,
            "run.label_fraction": fraction,
            "run.n_train": n_train,
            "teacher.weights_sha256": teacher_sha256 or "none (random init)",
            "dataset.version": context.data_version,
        }
    )
    log_transfer_choice(context.choice)
    logged = mlflow.active_run().data.metrics  # a continued run has them already
    counts = context.ingest_counts
    mlflow.log_metrics({f"ingest_{k}": v for k, v in counts.items() if f"ingest_{k}" not in logged})


@sigterm_deferred()
def log_transfer_choice(choice: TransferChoice | None) -> None:
    """The evidence step's choice on the active run: tags, the choice with every tap's
    evidence (JSON and a table) and the plot of probe score against depth."""
    if choice is None:
        return
    content = choice.to_dict()
    mlflow.set_tags(
        {
            "medtransfer.auto.teacher": choice.teacher,
            "medtransfer.auto.strategy": choice.strategy,
            "medtransfer.auto.unfreeze_blocks": str(choice.unfreeze_blocks),
            "medtransfer.auto.confidence": choice.confidence,
            "medtransfer.auto.runner_up": choice.runner_up or "none",
        }
    )
    mlflow.log_dict({k: v for k, v in content.items() if k != "evidence"}, "auto/decision.json")
    rows = content["evidence"]
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "auto/evidence.json")
    decision = decision_rows(choice)
    if decision:  # the pilots' table and the plot of accuracy against inherited exposure
        flat = [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in decision]
        mlflow.log_table({key: [row[key] for row in flat] for key in flat[0]}, "auto/pilots.json")
        mlflow.log_text("\n".join(decision_table(choice)) + "\n", "auto/decision_table.md")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "evidence.png"
        plot_evidence(choice, path)
        mlflow.log_artifact(str(path), "auto")
        path = Path(folder) / "accuracy_vs_exposure.png"
        if plot_decision(choice, path):
            mlflow.log_artifact(str(path), "auto")


@sigterm_deferred()
def log_evaluation_and_model(
    evaluation: Evaluation, model: nn.Module, context: TrainRunContext
) -> None:
    """Log to the active run the selected student, as an MLflow PyTorch model with a signature
    and an input example of two validation images, then its evaluation, linked to that model
    and to the dataset so that the model's page shows them."""
    dataset = context.dataset
    example = uint8_to_model_pixels(dataset.images[dataset.indices("val")[:2]])
    # the one forward pass, calibrated as served (the model is already in eval mode on the CPU)
    kind = kind_named(dataset.label_kind)  # multi-label: each finding's sigmoid
    output = run_model(model, example, temperature=evaluation.temperature, kind=kind)
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
        dataset=mlflow_dataset(dataset, context.data_version),
    )


@sigterm_deferred()
def log_comparison(results: list[TrainedStudent], reports_dir: str) -> None:
    """Comparison table on the parent run, plus the data-efficiency plot for several fractions."""
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
