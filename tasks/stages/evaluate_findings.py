"""The evaluate stage for a multi-label student: the per-finding report, its plots and MLflow.

:func:`tasks.stages.evaluate.run_evaluate` hands a multi-label dataset here. Each finding gets
its temperature and threshold from validation and its test AUC, sensitivity and specificity
with patient-bootstrap intervals; the macro AUC (with its interval: what the gates and the
champion comparison read) and the micro AUC summarise them. Plots: each finding's test ROC and
a Grad-CAM grid with one map per predicted finding. Not measured here for multi-label: the
conformal prediction sets and the per-group table (both are defined on one class per image).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks import reports
from tasks.config import Params
from tasks.data.dataset import DatasetSource, ProcessedDataset
from tasks.evaluation import plot_data, plots
from tasks.evaluation.evaluation import GRADCAM_LAYER, evaluate_configured, gradcam_maps
from tasks.evaluation.finding_evaluation import FindingEvaluation, report_block, table_columns
from tasks.evaluation.metrics import reliability_curve
from tasks.figures import write_figures
from tasks.model.student_io import StudentSpec
from tasks.model.transforms import to_tensor_transform

logger = logging.getLogger(__name__)

NOT_MEASURED = "not measured for multi-label models (defined on one class per image)"


def run_evaluate_findings(
    params: Params, model: nn.Module, spec: StudentSpec, dataset: ProcessedDataset
) -> dict:
    """Evaluate the multi-label student ``model`` on ``dataset``; returns the metrics report
    (:func:`tasks.evaluation.finding_evaluation.report_block`, with ``conformal`` and
    ``groups`` saying they were not measured)."""
    evaluation = evaluate_configured(model, dataset, params.eval, params.seed)
    assert isinstance(evaluation, FindingEvaluation)
    report = report_block(evaluation, params.eval.bootstrap, params.seed)
    report["conformal"] = {"not_measured": NOT_MEASURED}
    report["groups"] = {"not_measured": NOT_MEASURED}
    figures = [
        plots.plot_roc(
            {
                f"{row['finding']} (AUC {row['auc']:.3f})": _known_cells(evaluation, k)
                for k, row in enumerate(evaluation.tables["test"]["findings"])
            },
            reports.plot_path(params.reports_dir, "roc.png"),
            title=f"ROC per finding (test): {spec.teacher} {spec.strategy}",
        ),
        finding_gradcam_grid(
            model,
            dataset,
            evaluation,
            reports.plot_path(params.reports_dir, "gradcam_test.png"),
            params.eval.gradcam_examples,
        ),
        *pooled_plots(params.reports_dir, evaluation),
    ]
    write_plot_data(params.reports_dir, evaluation)
    reports.METRICS.write(params.reports_dir, report)
    write_figures(params.reports_dir, "evaluate", finding_figures(report))
    _log_to_training_run(params, evaluation, figures, report, dataset.source)
    macro = report["test"]
    low, high = evaluation.intervals.get("auc", (float("nan"), float("nan")))
    logger.info(
        "evaluate: test macro AUC %.3f (95%% CI %.3f-%.3f), micro AUC %.3f, %d findings, "
        "%d images of %d patients",
        macro["auc"],
        low,
        high,
        macro["micro_auc"],
        len(evaluation.findings),
        macro["n_images"],
        macro["n_patients"],
    )
    return report


def _known_cells(evaluation: FindingEvaluation, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Finding ``k``'s known test cells: 0/1 labels ``(M,)`` and its probabilities ``(M,)``
    (an unknown cell, NaN, is left out of its ROC as of its figures)."""
    labels = evaluation.labels["test"][:, k]
    known = np.isfinite(labels)
    return labels[known].astype(np.int64), evaluation.probabilities["test"][known, k]


def _cells(evaluation: FindingEvaluation, probabilities: np.ndarray) -> tuple:
    """Every known test image-finding cell: 0/1 labels ``(M,)`` and two-column probabilities
    ``(M, 2)`` (absent, present), the binary layout the single-label plots take."""
    labels = evaluation.labels["test"]
    known = np.isfinite(labels)
    p = probabilities[known]
    return labels[known].astype(np.int64), np.stack([1 - p, p], axis=1)


def write_plot_data(reports_dir: str, evaluation: FindingEvaluation) -> None:
    """The evaluate stage's plot data (dvc.yaml's plots) for findings: ROC rows per finding
    (``class`` the finding), confusion rows per image-finding cell (``<finding>: present`` or
    ``absent``, at its threshold), reliability over the pooled cells (before and after each
    finding's temperature), and no group rows (not measured)."""
    labels, probabilities = evaluation.labels["test"], evaluation.probabilities["test"]
    roc, confusion = [], []
    for k, name in enumerate(evaluation.findings):
        known = np.isfinite(labels[:, k])
        y, p = labels[known, k].astype(np.int64), probabilities[known, k]
        roc += [{"class": name, **point} for point in plot_data.roc_rows(y, p)]
        words = np.array([f"{name}: absent", f"{name}: present"])
        decided = (p >= evaluation.thresholds[k]).astype(np.int64)
        confusion += plot_data.confusion_rows(y, decided, list(words))
    reliability = [
        {**point, "calibration": name}
        for name, source in (
            ("uncalibrated", evaluation.raw_probabilities["test"]),
            ("calibrated", probabilities),
        )
        for point in reliability_curve(*_cells(evaluation, source))
    ]
    plot_data.write_rows(reports_dir, plot_data.ROC, roc)
    plot_data.write_rows(reports_dir, plot_data.CONFUSION, confusion)
    plot_data.write_rows(reports_dir, plot_data.RELIABILITY, reliability)
    plot_data.write_rows(reports_dir, plot_data.GROUPS, [])


def pooled_plots(reports_dir: str, evaluation: FindingEvaluation) -> list[Path]:
    """The confusion (absent/present over every test image-finding cell, each at its
    finding's threshold) and the reliability diagram of the pooled cells, before and after
    each finding's temperature."""
    labels, calibrated = _cells(evaluation, evaluation.probabilities["test"])
    decided = (evaluation.probabilities["test"] >= evaluation.thresholds)[
        np.isfinite(evaluation.labels["test"])
    ].astype(np.int64)
    matrix = [[int(((labels == a) & (decided == p)).sum()) for p in (0, 1)] for a in (0, 1)]
    return [
        plots.plot_confusion(
            matrix,
            ["absent", "present"],
            reports.plot_path(reports_dir, "confusion_test.png"),
            "test, every image-finding cell at its finding's threshold",
        ),
        plots.plot_reliability(
            {
                "before (T=1)": _cells(evaluation, evaluation.raw_probabilities["test"]),
                "after (T per finding)": (labels, calibrated),
            },
            reports.plot_path(reports_dir, "reliability_test.png"),
        ),
    ]


def finding_figures(report: dict) -> dict[str, dict]:
    """The report's decisive figures, each with its interval and n (test patients): the
    macro AUC (``test_auc``), the micro AUC, and each finding's AUC, sensitivity and
    specificity (``test_<measure>.<finding>``)."""
    test = report["test"]
    n = test.get("n_patients")

    def figure(value, bounds) -> dict:
        bounds = bounds or {}
        return {"estimate": value, "ci_low": bounds.get("low"), "ci_up": bounds.get("high"), "n": n}

    figures = {
        "test_auc": figure(test["macro_auc"], test.get("macro_auc_ci95")),
        "test_micro_auc": figure(test["micro_auc"], test.get("micro_auc_ci95")),
    }
    for row in test["findings"]:
        for measure in ("auc", "sensitivity", "specificity"):
            figures[f"test_{measure}.{row['finding']}"] = figure(
                row[measure], row.get(f"{measure}_ci95")
            )
    return figures


def finding_gradcam_grid(
    model: nn.Module,
    dataset: ProcessedDataset,
    evaluation: FindingEvaluation,
    path: Path,
    images_shown: int = 4,
) -> Path:
    """Grad-CAM for each finding predicted (at its threshold) on the first ``images_shown``
    test images that have one: one panel per (image, predicted finding), captioned with the
    finding, its probability and whether the image truly has it."""
    images, labels = dataset.subset("test")
    probabilities = evaluation.probabilities["test"]
    decided = probabilities >= evaluation.thresholds
    pairs = [
        (i, k)
        for i in np.flatnonzero(decided.any(axis=1))[:images_shown]
        for k in np.flatnonzero(decided[i])
    ]
    if not pairs:  # nothing predicted anywhere: show the most probable finding of one image
        pairs = [(0, int(probabilities[0].argmax()))]
    transform = to_tensor_transform(dataset.channels)
    batch = torch.stack([transform(np.asarray(images[i], dtype=np.float32)) for i, _ in pairs])
    maps = gradcam_maps(model, GRADCAM_LAYER, batch.float(), np.array([k for _, k in pairs]))
    captions = [
        f"{evaluation.findings[k]} {probabilities[i, k]:.2f} ({_truth_word(labels[i, k])})"
        for i, k in pairs
    ]
    shown = [np.asarray(images[i]) / 255.0 for i, _ in pairs]
    shown = [image if image.ndim == 2 else np.moveaxis(image, 0, -1) for image in shown]
    return plots.plot_image_grid(shown, list(maps[:, 0]), captions, path)


def _truth_word(label: float) -> str:
    """A Grad-CAM caption's truth of a predicted finding: true, FALSE or unknown (NaN)."""
    return "unknown" if np.isnan(label) else "true" if label == 1 else "FALSE"


def _log_to_training_run(
    params: Params,
    evaluation: FindingEvaluation,
    figures: list[Path],
    report: dict,
    source: DatasetSource,
) -> None:
    """Add the evaluation to the MLflow run that trained the student: flat metrics (macro,
    micro, each finding's figures with intervals), the plots, the report and the per-finding
    table (``evaluation/per_finding_test.json``)."""
    import mlflow

    from tasks.tracking.configure import configure_mlflow, logged_model_id

    run_id = (reports.TRAIN.read_if_present(params.reports_dir) or {}).get("run_id")
    if not run_id:
        return
    configure_mlflow(params)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(source.mlflow_tags(prefix="evaluate."))
        low, high = evaluation.intervals.get("auc", (float("nan"), float("nan")))
        mlflow.set_tag(
            "test_auc",
            f"macro {evaluation.test.auc:.3f} [{low:.3f}, {high:.3f}] "
            f"n={evaluation.n_test_patients}",
        )
        mlflow.log_metrics(
            {f"eval_{k}": v for k, v in evaluation.metrics().items() if np.isfinite(v)},
            model_id=logged_model_id(run_id),
        )
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_dict(report, "evaluation/metrics.json")
        mlflow.log_table(table_columns(evaluation), "evaluation/per_finding_test.json")
