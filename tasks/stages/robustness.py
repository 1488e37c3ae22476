"""Robustness stage: how exposed is the student, and how much of that comes from its teacher?

``medtransfer robustness`` / ``dvc repro robustness`` / the Prefect flow call
:func:`run_robustness`. On a seeded subset of the test split it measures, at every budget in
``robustness.epsilons_255``: white-box FGSM and PGD on the student, the teacher-transfer attacks
(crafted on the public teacher alone), uniform noise; then the same attacks on a linear probe
over the frozen teacher, the part a student inherits untouched (the reference line). The
promotion gates in ``gates`` turn the numbers into a verdict with reasons, which the registry
stage reads from ``reports/robustness.json``. A failed gate is a normal outcome.

When training compared strategies (``train.compare``), each saved strategy is attacked too and
the report carries a table of inherited exposure against the number of frozen blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.config import checked_section
from tasks.data.dataset import ProcessedDataset, load_processed
from tasks.model.student_io import STRATEGIES_SUBDIR, load_student
from tasks.robustness.attacks import evaluate_robustness
from tasks.robustness.verdict import (
    ReferenceCurve,
    RobustnessResult,
    gate_verdict,
    metric_key,
    plot_robustness_curves,
)
from tasks.stages.evaluate import evaluate_student

ROBUSTNESS_REPORT = "robustness.json"


@dataclass(frozen=True)
class RobustnessConfig:
    """The ``robustness`` section of params.yaml (budgets in 1/255 pixel units)."""

    max_samples: int | None = 32
    epsilons_255: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    pgd_steps: int = 3
    pgd_step_fraction: float | None = None
    batch_size: int = 32
    reference_probe: bool = True
    reference_probe_steps: int = 300

    @classmethod
    def from_params(cls, params: dict) -> RobustnessConfig:
        section = checked_section(params, "robustness", cls.__dataclass_fields__)
        if "epsilons_255" in section:
            section["epsilons_255"] = tuple(float(e) for e in section["epsilons_255"])
        return cls(**section)

    @property
    def epsilons(self) -> tuple[float, ...]:
        """Budgets in pixel units ([0, 1] scale), budget 0 first as the clean reference."""
        return (0.0, *sorted(e / 255.0 for e in self.epsilons_255 if e > 0))

    def attack(
        self,
        model: nn.Module,
        teacher: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        seed: int,
        target_pool: tuple[np.ndarray, np.ndarray],
        crafted: dict,
        device: str = "cpu",
    ) -> RobustnessResult:
        """:func:`tasks.attacks.evaluate_robustness` of ``model`` at these budgets and steps.

        ``crafted``: one dict shared by every model attacked on the same images, so the
        teacher-transfer perturbations are crafted once.
        """
        return evaluate_robustness(
            model,
            teacher,
            images,
            labels,
            self.epsilons,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_fraction,
            batch_size=self.batch_size,
            seed=seed,
            device=device,
            target_pool=target_pool,
            crafted=crafted,
        )


def gates_in_pixels(gates: dict | None) -> dict:
    """``gates`` from params.yaml with ``*_eps_255`` budgets converted to pixel units."""
    converted = {}
    for key, value in (gates or {}).items():
        if key.endswith("_eps_255"):
            converted[key.removesuffix("_255")] = None if value is None else float(value) / 255.0
        else:
            converted[key] = value
    return converted


def attack_subset(
    dataset: ProcessedDataset, max_samples: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset of the test split as float [0, 1] ``(N, 1, S, S)`` images and labels."""
    indices = dataset.indices("test")
    if max_samples is not None and len(indices) > max_samples:
        indices = np.sort(
            np.random.default_rng(seed).choice(indices, size=max_samples, replace=False)
        )
    images = np.asarray(dataset.images[indices], dtype=np.float32)[:, None] / 255.0
    return images, dataset.labels[indices]


def fit_linear_probe(teacher: str, dataset: ProcessedDataset, steps: int, seed: int) -> nn.Module:
    """A linear probe on the frozen teacher: its head fitted on the train split's features.

    The backbone is never trained, so features are computed once and the head is fitted on
    them (full-batch Adam, class-balanced loss): seconds, where fine-tuning takes minutes.
    """
    from tasks.model.student import build_student

    torch.manual_seed(seed)
    probe = build_student(
        teacher, "linear_probe", num_classes=len(dataset.classes), pretrained=True, dropout=0.0
    )
    probe.eval()
    images, labels = dataset.subset("train")
    with torch.no_grad():
        features = torch.cat(
            [
                probe.features(
                    torch.from_numpy(images[i : i + 64, None].astype(np.float32) / 255.0)
                )
                for i in range(0, len(images), 64)
            ]
        )
    targets = torch.from_numpy(labels)
    counts = torch.bincount(targets, minlength=len(dataset.classes)).clamp_min(1).float()
    criterion = nn.CrossEntropyLoss(weight=len(targets) / (len(counts) * counts))
    optimizer = torch.optim.Adam(probe.head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(probe.head(features), targets).backward()
        optimizer.step()
    return probe.eval()


def run_robustness(params: dict) -> dict:
    """The robustness stage; returns the content of ``reports/robustness.json``."""
    from tasks.model.student import teacher_feature_extractor

    config = RobustnessConfig.from_params(params)
    seed = int(params.get("seed", 0))
    gates = gates_in_pixels(params.get("gates"))
    dataset = load_processed(params["data"]["processed_dir"])
    model_dir = Path((params.get("train") or {}).get("model_dir", "models/student"))
    student, spec = load_student(model_dir)
    images, labels = attack_subset(dataset, config.max_samples, seed)
    teacher = teacher_feature_extractor(spec.teacher)
    target_pool = attack_subset(dataset, None, seed)  # mimicry targets: other-class test images
    crafted: dict = {}  # teacher-transfer perturbations, crafted once for every model scored

    def attack(model: nn.Module) -> RobustnessResult:
        return config.attack(
            model, teacher, images, labels, seed=seed, target_pool=target_pool, crafted=crafted
        )

    result = attack(student)
    clean = evaluate_student(
        student, dataset, str((params.get("eval") or {}).get("threshold", "youden"))
    )
    verdict = gate_verdict(result.to_metrics(), clean.test.auc, gates)

    reference = None
    if config.reference_probe:
        probe = fit_linear_probe(spec.teacher, dataset, config.reference_probe_steps, seed)
        reference = attack(probe)

    strategies = _compare_strategies(model_dir, attack, gates)
    reports = Path(params.get("reports_dir", "reports"))
    plot = plot_robustness_curves(
        result,
        reports / "plots" / "robustness.png",
        reference=ReferenceCurve.from_result(
            reference, "frozen-teacher probe, teacher-transfer", "teacher_transfer_acc"
        )
        if reference
        else None,
        title=f"{spec.strategy} student of {spec.teacher} under attack",
    )
    report = {
        "verdict": {
            "passed": verdict.passed,
            "reasons": list(verdict.reasons),
            "checked": list(verdict.checked),
        },
        "clean_test_auc": clean.test.auc,
        "n_examples": result.n_examples,
        "strategy": spec.strategy,
        "metrics": result.to_metrics(),
        "table": result.to_table(),
        "reference_probe": {"metrics": reference.to_metrics(), "table": reference.to_table()}
        if reference
        else None,
        "strategies": strategies,
        "config": {**asdict(config), "epsilons": list(config.epsilons)},
    }
    reports.mkdir(parents=True, exist_ok=True)
    (reports / ROBUSTNESS_REPORT).write_text(json.dumps(report, indent=2, default=float) + "\n")
    _log(params, reports, report, plot)
    return report


def _compare_strategies(model_dir: Path, attack, gates: dict) -> list[dict]:
    """Attack every strategy saved by a ``train.compare`` run; one table row each."""
    rows = []
    folder = model_dir / STRATEGIES_SUBDIR
    if not folder.is_dir():
        return rows
    robust_eps = gates.get("robust_acc_eps") or 1 / 255
    transfer_eps = gates.get("teacher_transfer_eps") or 1 / 255
    for strategy_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        model, _ = load_student(strategy_dir)
        result = attack(model)
        metrics = result.to_metrics()
        frozen = (
            sum(1 for m in model.frozen_modules() for p in m.parameters())
            if hasattr(model, "frozen_modules")
            else 0
        )
        rows.append(
            {
                "strategy": strategy_dir.name,  # the variant, e.g. partial+pgd
                "frozen_parameter_tensors": frozen,
                "clean_acc": result.clean_acc,
                "robust_acc_pgd": metrics.get(metric_key("robust_acc_pgd", robust_eps)),
                "teacher_transfer_success": metrics.get(
                    metric_key("teacher_transfer_success", transfer_eps)
                ),
                "teacher_mimicry_success": metrics.get(
                    metric_key("teacher_mimicry_success", transfer_eps)
                ),
            }
        )
    return rows


def _log(params: dict, reports: Path, report: dict, plot: Path) -> None:
    """Metrics, plot, report and verdict onto the MLflow run that trained the student."""
    import mlflow

    from tasks.tracking import configure_mlflow

    train_report = reports / "train.json"
    if not train_report.is_file():
        return
    trained = json.loads(train_report.read_text())
    if not trained.get("run_id"):
        return
    configure_mlflow(params)
    finite = {k: v for k, v in report["metrics"].items() if v is not None and np.isfinite(v)}
    with mlflow.start_run(run_id=trained["run_id"]):
        mlflow.log_metrics(finite)
        if report["reference_probe"]:
            mlflow.log_metrics(
                {
                    f"probe_{k}": v
                    for k, v in report["reference_probe"]["metrics"].items()
                    if v is not None and np.isfinite(v)
                }
            )
        mlflow.log_artifact(str(plot), artifact_path="robustness")
        mlflow.log_dict(report, "robustness/robustness.json")
        mlflow.set_tag("robustness_verdict", "pass" if report["verdict"]["passed"] else "fail")
    if report["strategies"] and trained.get("parent_run_id"):
        with mlflow.start_run(run_id=trained["parent_run_id"]):
            rows = report["strategies"]
            mlflow.log_table(
                {key: [row[key] for row in rows] for key in rows[0]}, "robustness_by_strategy.json"
            )
