"""The evaluate stage: val and test metrics of the saved student at a threshold chosen on val,
ROC, confusion matrix and Grad-CAM plots; the metrics report; all of it added to the student's
MLflow training run.

Called by ``medtransfer evaluate``, ``dvc repro evaluate``, the Prefect flow and the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks import reports
from tasks.config import Params
from tasks.data.dataset import DatasetSource, ProcessedDataset, load_processed
from tasks.errors import MedtransferError
from tasks.evaluation import conformal, group_metrics, per_class, plot_data, plots
from tasks.evaluation.evaluation import GRADCAM_LAYER, Evaluation, evaluate_configured, gradcam_grid
from tasks.evaluation.metrics import SplitMetrics, expected_calibration_error
from tasks.figures import evaluation_figures, write_figures
from tasks.model.student_io import StudentSpec, load_student
from tasks.stages.evaluate_findings import run_evaluate_findings
from tasks.stages.preflight import check_stage_outputs

logger = logging.getLogger(__name__)


def run_evaluate(params: Params) -> dict:
    """Evaluate the student saved in ``train.model_dir`` on ``data.processed_dir``.

    Returns:
        The content of the metrics report (:data:`tasks.reports.METRICS`): threshold rule and
        value, per split AUC, accuracy, sensitivity, specificity, ECE and confusion, the
        conformal sets' test coverage (``conformal``) and the worst group's AUC (``groups``;
        the per-group table is the plot data ``plots/groups_test.json``).

    Raises:
        MedtransferError: the student and the dataset disagree on classes or image size.
    """
    check_stage_outputs("evaluate", params)
    dataset = load_processed(params.data.processed_dir)
    source = dataset.source  # refuses a dataset that does not record its source
    model, spec = load_student(params.train.model_dir)
    _check_matches(spec, dataset)
    if dataset.multilabel:  # a finding per column: its own report (tasks.stages.evaluate_findings)
        return run_evaluate_findings(params, model, spec, dataset)
    evaluation = evaluate_configured(model, dataset, params.eval, params.seed)
    _check_temperature(spec, evaluation)
    figures = _plots(params, model, spec, dataset, evaluation)
    report = evaluation_report(evaluation, params.eval.bootstrap, params.seed)
    sets, report["conformal"] = conformal_sets(dataset, evaluation, params.serving.coverage)
    rows = group_metrics.split_group_rows(dataset, evaluation, params.eval, params.seed, sets)
    report["groups"] = group_metrics.worst_summary(rows)
    plot_data.write_evaluation_plots(params.reports_dir, evaluation, dataset.classes)
    plot_data.write_rows(params.reports_dir, plot_data.GROUPS, rows)
    reports.METRICS.write(params.reports_dir, report)
    write_figures(params.reports_dir, "evaluate", evaluation_figures(report))
    extra = {
        **group_metrics.mlflow_metrics(rows),
        **conformal.report_metrics(report["conformal"], "conformal_"),
    }
    _log_to_training_run(params, evaluation, figures, report, source, extra)
    _log_summary(evaluation)
    return report


def _log_summary(evaluation: Evaluation) -> None:
    """One log line of the test figures: sensitivity and specificity at the threshold for two
    classes; the balanced accuracy (top class) for more."""
    test, ci = evaluation.test, evaluation.intervals
    nan = (float("nan"), float("nan"))
    if evaluation.per_class:
        bounds = evaluation.per_class.get("balanced_accuracy_ci95") or {}
        decision = (
            f"balanced accuracy {evaluation.per_class['balanced_accuracy']:.3f} (95% CI "
            f"{bounds.get('low', nan[0]):.3f}-{bounds.get('high', nan[1]):.3f}), top class"
        )
    else:
        decision = (
            f"sensitivity {test.sensitivity:.3f}, specificity {test.specificity:.3f} at "
            f"threshold {evaluation.threshold:.3f} ({evaluation.threshold_rule})"
        )
    logger.info(
        "evaluate: test AUC %.3f (95%% CI %.3f-%.3f, %d images of %d patients), %s, "
        "temperature %.2f",
        test.auc,
        *ci.get("auc", nan),
        len(evaluation.labels["test"]),
        evaluation.n_test_patients,
        decision,
        evaluation.temperature,
    )


def conformal_sets(
    dataset: ProcessedDataset, evaluation: Evaluation, coverage: float
) -> tuple[np.ndarray, dict]:
    """The test split's prediction sets ``(N, C)`` bool at ``coverage``, calibrated on the
    validation split as packaging does (:mod:`tasks.evaluation.conformal`), and the report
    block: the rule and the test coverage with its Wilson interval and mean set size."""
    draws = conformal.split_uniforms(dataset)
    rule = conformal.calibrate(
        evaluation.probabilities["val"], evaluation.labels["val"], coverage, draws["val"]
    )
    sets = rule.sets(evaluation.probabilities["test"], draws["test"])
    return sets, conformal.conformal_report(
        rule, conformal.measure(sets, evaluation.labels["test"])
    )


def evaluation_report(evaluation: Evaluation, resamples: int, seed: int) -> dict:
    """The metrics report: threshold, calibration (temperature, ECE before and after), and per
    split the metrics; the test split also its size and each metric's 95% interval
    (``ci95.auc.low``/``high``, bootstrap over patients); with more than two classes the test
    split also its ``per_class`` table and ``balanced_accuracy`` (with ``ci95``)."""
    raw = evaluation.raw_probabilities
    test = _split_report(evaluation.test)
    test["n_images"] = len(evaluation.labels["test"])
    test["n_patients"] = evaluation.n_test_patients
    test["ci95"] = {
        name: {"low": low, "high": high} for name, (low, high) in evaluation.intervals.items()
    }
    if evaluation.per_class:  # more than two classes: each class's figures and their mean
        test["per_class"] = evaluation.per_class["classes"]
        test["balanced_accuracy"] = evaluation.per_class["balanced_accuracy"]
        if "balanced_accuracy_ci95" in evaluation.per_class:
            test["ci95"]["balanced_accuracy"] = evaluation.per_class["balanced_accuracy_ci95"]
    return {
        "threshold_rule": evaluation.threshold_rule,
        "threshold": evaluation.threshold,
        "calibration": {
            "temperature": evaluation.temperature,
            **{
                f"{split}_ece_uncalibrated": expected_calibration_error(
                    evaluation.labels[split], raw[split]
                )
                for split in raw
            },
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient"},
        "val": _split_report(evaluation.val),
        "test": test,
    }


def _check_temperature(spec: StudentSpec, evaluation: Evaluation) -> None:
    """Warn when the temperature saved with the student (what serving applies) is not the one
    fitted here: the student was trained under another ``eval.calibration``."""
    if abs(spec.temperature - evaluation.temperature) > 1e-3 * evaluation.temperature:
        logger.warning(
            "evaluate: the student was saved with temperature %.3f but validation gives %.3f; "
            "the served probabilities use %.3f. Re-run `medtransfer train` to align them.",
            spec.temperature,
            evaluation.temperature,
            spec.temperature,
        )


def _check_matches(spec: StudentSpec, dataset: ProcessedDataset) -> None:
    if spec.label_kind != dataset.label_kind:
        raise MedtransferError(
            f"The saved student is {spec.label_kind} but the processed dataset is "
            f"{dataset.label_kind}. Re-run `medtransfer train`."
        )
    if list(spec.classes) != dataset.classes or spec.image_size != dataset.image_size:
        raise MedtransferError(
            f"The saved student was trained on classes {list(spec.classes)} at {spec.image_size} px, but the "
            f"processed dataset has {dataset.classes} at {dataset.image_size} px. Re-run `medtransfer train`."
        )


def _plots(
    params: Params, model, spec: StudentSpec, dataset: ProcessedDataset, evaluation: Evaluation
) -> list[Path]:
    """ROC (val and test; with more than two classes each class against the rest on test),
    the test confusion matrix, the reliability diagram and the Grad-CAM grid; their paths."""
    binary = len(dataset.classes) == 2
    return [
        plots.plot_roc(
            _roc_curves(evaluation, dataset.classes),
            reports.plot_path(params.reports_dir, "roc.png"),
            title=f"ROC{'' if binary else ' (test, one vs rest)'}: {spec.teacher} {spec.strategy}",
        ),
        plots.plot_confusion(
            evaluation.test.confusion,
            dataset.classes,
            reports.plot_path(params.reports_dir, "confusion_test.png"),
            f"test, threshold {evaluation.threshold:.3f}" if binary else "test, top class",
        ),
        plots.plot_reliability(
            {
                f"before (T=1, ECE {evaluation.metrics()['test_ece_uncalibrated']:.3f})": (
                    evaluation.labels["test"],
                    evaluation.raw_probabilities["test"],
                ),
                f"after (T={evaluation.temperature:.2f}, ECE {evaluation.test.ece:.3f})": (
                    evaluation.labels["test"],
                    evaluation.probabilities["test"],
                ),
            },
            reports.plot_path(params.reports_dir, "reliability_test.png"),
        ),
        gradcam_grid(
            model,
            GRADCAM_LAYER,
            dataset,
            evaluation,
            reports.plot_path(params.reports_dir, "gradcam_test.png"),
            params.eval.gradcam_examples,
        ),
    ]


def _roc_curves(
    evaluation: Evaluation, classes: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (0/1 labels, scores)}``: the positive class on val and test for two classes,
    else each class against the rest on test (a binary ROC per class)."""
    if len(classes) == 2:
        return {
            s: (evaluation.labels[s], evaluation.probabilities[s][:, 1]) for s in ("val", "test")
        }
    labels, probabilities = evaluation.labels["test"], evaluation.probabilities["test"]
    return {
        f"{name} (AUC {row['auc']:.3f})": ((labels == c).astype(np.int64), probabilities[:, c])
        for c, (name, row) in enumerate(zip(classes, evaluation.per_class["classes"], strict=True))
    }


def _split_report(metrics: SplitMetrics) -> dict:
    return {
        "auc": metrics.auc,
        "accuracy": metrics.accuracy,
        "sensitivity": metrics.sensitivity,
        "specificity": metrics.specificity,
        "ece": metrics.ece,
        "confusion": metrics.confusion,
    }


def _log_to_training_run(
    params: Params,
    evaluation: Evaluation,
    figures: list[Path],
    report: dict,
    source: DatasetSource,
    extra: dict[str, float],
) -> None:
    """Add the evaluation to the MLflow run that trained the student (named by the train
    report); a student trained outside this pipeline has none, and the reports stand alone.

    The run is tagged ``evaluate.dataset.*`` with the evaluated dataset's own source record:
    what the figures were measured on, whatever ``data.source`` said when evaluate ran.
    ``extra``: the per-group and conformal figures, logged beside the evaluation's own.
    """
    import mlflow

    from tasks.tracking.configure import configure_mlflow, logged_model_id

    trained = reports.TRAIN.read_if_present(params.reports_dir)
    run_id = (trained or {}).get("run_id")
    if not run_id:
        return
    configure_mlflow(params)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(source.mlflow_tags(prefix="evaluate."))
        mlflow.set_tag("test_auc", _auc_tag(evaluation))  # a column of the runs list
        figures_now = {**evaluation.metrics(), **extra}
        mlflow.log_metrics(  # linked to the logged student: its model page shows them
            {f"eval_{k}": v for k, v in figures_now.items() if np.isfinite(v)},
            model_id=logged_model_id(run_id),
        )
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_dict(report, "evaluation/metrics.json")
        groups = reports.plot_path(params.reports_dir, plot_data.GROUPS)
        mlflow.log_artifact(str(groups), artifact_path="evaluation")
        if evaluation.per_class:  # the run page's table view of each class's figures
            mlflow.log_table(
                per_class.table_columns(evaluation.per_class), "evaluation/per_class_test.json"
            )


def _auc_tag(evaluation: Evaluation) -> str:
    """``0.871 [0.702, 0.968] n=18``: the test AUC, its interval and the test patients, as the
    runs list shows it (tags can be columns there; the metric is ``eval_test_auc``)."""
    low, high = evaluation.intervals.get("auc", (float("nan"), float("nan")))
    return f"{evaluation.test.auc:.3f} [{low:.3f}, {high:.3f}] n={evaluation.n_test_patients}"
