"""The robustness stage: how exposed is the student, and how much of that comes from its teacher?

Called by ``medtransfer robustness``, ``dvc repro robustness``, the Prefect flow and the tests.
On a seeded subset of the test split it measures, at every budget in ``robustness.epsilons_255``:
white-box FGSM and PGD on the student, the teacher-transfer attacks (crafted on the public
teacher alone), uniform noise; then the same attacks on a linear probe over the frozen teacher,
the part a student inherits untouched (the reference line). The promotion gates in ``gates``
turn the numbers into a verdict with reasons, which the registry stage reads from the robustness
report. A failed gate is a normal outcome.

When training compared strategies (``train.compare``), each saved strategy is attacked too and
the report carries a table of inherited exposure against the number of frozen blocks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import nn

from tasks import reports
from tasks.config import Params, RobustnessParams
from tasks.data.dataset import load_processed
from tasks.evaluation import group_metrics, plot_data
from tasks.evaluation.evaluation import Evaluation, evaluate_configured
from tasks.figures import verdict_figures, write_figures
from tasks.model.student_io import StudentSpec, load_student
from tasks.model.teacher_models import teacher_feature_extractor
from tasks.robustness.attacks.universal import natural_crops
from tasks.robustness.gates import gate_verdict
from tasks.robustness.plots import ReferenceCurve, plot_robustness_curves
from tasks.robustness.progress import BudgetProgress, curve_rows
from tasks.robustness.reference_probe import fit_linear_probe
from tasks.robustness.result import RobustnessResult
from tasks.robustness.strategy_table import AttackModel, compare_strategies
from tasks.robustness.suite import attack_subset, evaluate_robustness
from tasks.stages.preflight import check_stage_outputs
from tasks.stages.robustness_findings import run_robustness_findings
from tasks.tracking.robustness_run import log_robustness

logger = logging.getLogger(__name__)


def _plot_curves(
    params: Params,
    result: RobustnessResult,
    reference: RobustnessResult | None,
    spec: StudentSpec,
) -> Path:
    """The student's robustness curves, with the frozen-teacher probe's teacher-transfer
    curve as the reference when there is one; returns the PNG's path."""
    return plot_robustness_curves(
        result,
        reports.plot_path(params.reports_dir, "robustness.png"),
        reference=ReferenceCurve.from_result(
            reference, "frozen-teacher probe, teacher-transfer", "teacher_transfer_acc"
        )
        if reference
        else None,
        title=f"{spec.strategy} student of {spec.teacher} under attack",
    )


def run_robustness(params: Params, progress: bool = True) -> dict:
    """Attack the saved student (and its frozen-teacher probe), decide the verdict.

    ``progress``: a bar per attacked model over its budgets on stderr (a log line per budget
    comes either way).

    Returns:
        The content of the robustness report (:data:`tasks.reports.ROBUSTNESS`): ``verdict``
        (passed, reasons, checked), ``metrics``, the per-budget ``table``, the reference
        probe's, the per-strategy rows and the configuration.
    """
    check_stage_outputs("robustness", params)
    config, seed, gates = params.robustness, params.seed, params.gates.in_pixels()
    dataset = load_processed(params.data.processed_dir)
    model_dir = Path(params.train.model_dir)
    student, spec = load_student(model_dir)
    if dataset.multilabel:  # flip rates per finding: tasks.stages.robustness_findings
        return run_robustness_findings(params, dataset, student, spec)
    teacher = teacher_feature_extractor(spec.teacher, channels=spec.channels)
    attack = _attack_on_shared_images(params, dataset, teacher, progress)
    logger.info(
        "robustness: attacking the %s student at %d budgets",
        spec.strategy,
        len(config.epsilons) - 1,
    )
    result = attack(student, "student")
    clean = evaluate_configured(student, dataset, params.eval, seed)
    groups = group_metrics.split_group_rows(dataset, clean, params.eval, seed)
    verdict = gate_verdict(
        result.to_metrics(),
        clean.test.auc,
        gates,
        result=result,
        clean_auc_interval=clean.intervals.get("auc"),
        n_test=len(clean.labels["test"]),
        worst_group=group_metrics.worst_group(groups),
    )
    reference = None
    if config.reference_probe:
        logger.info("robustness: attacking a linear probe on the frozen teacher (reference)")
        probe = fit_linear_probe(spec.teacher, dataset, config.reference_probe_steps, seed)
        reference = attack(probe, "frozen-teacher probe")
    strategies = compare_strategies(model_dir, attack, gates)
    plot = _plot_curves(params, result, reference, spec)
    report = _report(verdict, clean, result, reference, strategies, spec.strategy, config)
    report["worst_group"] = group_metrics.worst_summary(groups)
    report["run_id"] = judged_run_id(params)
    plot_data.write_rows(params.reports_dir, plot_data.ROBUSTNESS, curve_rows(result, reference))
    reports.ROBUSTNESS.write(params.reports_dir, report)
    write_figures(params.reports_dir, "robustness", verdict_figures(report["verdict"]))
    log_robustness(params, report, plot)
    logger.info(
        "robustness verdict: %s on %d images%s",
        "PASS" if verdict.passed else "FAIL",
        result.n_examples,
        "".join(f"; {reason}" for reason in verdict.reasons),
    )
    return report


def _report(
    verdict,
    clean: Evaluation,
    result: RobustnessResult,
    reference: RobustnessResult | None,
    strategies: list[dict],
    strategy: str,
    config: RobustnessParams,
) -> dict:
    """The content of the robustness report."""
    return {
        "verdict": verdict.to_report(),
        "clean_test_auc": clean.test.auc,
        "clean_test_auc_ci95": list(clean.intervals.get("auc", (None, None))),
        "n_examples": result.n_examples,
        "strategy": strategy,
        "metrics": result.to_metrics(),
        "intervals": {key: list(bounds) for key, bounds in result.to_intervals().items()},
        "table": result.to_table(),
        "reference_probe": {
            "n_examples": reference.n_examples,
            "metrics": reference.to_metrics(),
            "intervals": {key: list(b) for key, b in reference.to_intervals().items()},
            "table": reference.to_table(),
        }
        if reference
        else None,
        "strategies": strategies,
        "config": {**dataclasses.asdict(config), "epsilons": list(config.epsilons)},
    }


def _attack_on_shared_images(
    params: Params, dataset, teacher: nn.Module, progress: bool
) -> AttackModel:
    """One attack function for every model scored in this run: the same seeded images, the
    same teacher, and teacher-transfer perturbations crafted once and shared; each call
    reports its budgets as they finish."""
    images, labels = attack_subset(dataset, params.robustness.max_samples, params.seed)
    target_pool = attack_subset(dataset, None, params.seed)  # mimicry: other-class test images
    natural = natural_crops(
        params.robustness.universal_images, dataset.image_size, params.seed, dataset.channels
    )
    crafted: dict = {}

    def attack(model: nn.Module, label: str = "") -> RobustnessResult:
        budgets = len([eps for eps in params.robustness.epsilons if eps > 0])
        name = label or type(model).__name__
        with BudgetProgress(name, budgets, len(labels), progress) as report:
            return evaluate_robustness(
                model,
                teacher,
                images,
                labels,
                params.robustness,
                seed=params.seed,
                target_pool=target_pool,
                crafted=crafted,
                natural_images=natural,
                on_budget=report,
            )

    return attack


def judged_run_id(params: Params) -> str | None:
    """The MLflow run that trained the student judged here (``train.json``'s ``run_id``), so
    that ``register`` can refuse this verdict for another run; None without a train report."""
    trained = reports.TRAIN.read_if_present(params.reports_dir) or {}
    return str(trained["run_id"]) if trained.get("run_id") else None
