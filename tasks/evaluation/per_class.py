"""Per-class figures of a single-label model with more than two classes.

One number per split hides which class a model cannot tell apart. For each class: its
one-vs-rest ROC AUC (the class's probability ranking its images above the others'), its
sensitivity (recall: share of its images predicted as it) and its precision (share of the
images predicted as it that are it), each with a 95% patient-bootstrap interval; and the
balanced accuracy (the mean of the per-class sensitivities) with its interval. Pure numpy on
labels, probabilities and decisions; the bootstrap reuses :mod:`tasks.evaluation.metrics`'
patient weights, so a class's AUC interval is drawn from the same resamples as the macro one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tasks.evaluation.metrics import binary_auc, patient_weights, percentile_interval

# The per-class measures, in report order (each also gets ``<name>_ci95``).
MEASURES = ("auc", "sensitivity", "precision")


def class_measures(
    labels: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every class's AUC, sensitivity and precision under each row of ``weights``.

    Args:
        labels: ``(N,)`` class indices; probabilities: ``(N, C)``; predicted: ``(N,)`` the
            decided classes.
        weights: ``(B, N)`` how often each image counts in each row (ones for the plain
            figures, a bootstrap's draws otherwise).

    Returns:
        ``{measure: (C, B)}`` for :data:`MEASURES`, plus ``balanced_accuracy`` ``(B,)`` (the
        mean over classes of the sensitivity, over the classes a row holds). NaN where a row
        cannot define the figure (no image of the class, or none predicted as it).
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    weights = np.asarray(weights, dtype=np.float64)
    n_classes = probabilities.shape[1]
    result = {name: np.full((n_classes, len(weights)), np.nan) for name in MEASURES}
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in range(n_classes):
            truth, chosen = labels == c, predicted == c
            result["auc"][c] = binary_auc(truth.astype(np.int64), probabilities[:, c], weights)
            result["sensitivity"][c] = (
                weights[:, truth] @ chosen[truth] / weights[:, truth].sum(axis=1)
            )
            result["precision"][c] = (
                weights[:, chosen] @ truth[chosen] / weights[:, chosen].sum(axis=1)
            )
    sensitivity = result["sensitivity"]
    present = np.isfinite(sensitivity)
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = np.where(present, sensitivity, 0.0).sum(axis=0) / present.sum(axis=0)
    return {**result, "balanced_accuracy": balanced}


def per_class_report(
    labels: np.ndarray,
    probabilities: np.ndarray,
    predicted: np.ndarray,
    classes: Sequence[str],
    groups: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The per-class table of one split, with intervals by bootstrap over patients.

    Args:
        labels, probabilities, predicted: as :func:`class_measures`.
        classes: the ``C`` class names, in index order.
        groups: ``(N,)`` patient of each image (the bootstrap's unit).
        resamples: bootstrap draws (0: no intervals); seed: their seed.

    Returns:
        ``{"classes": [{"class", "n", "auc", "auc_ci95": {"low", "high"}, "sensitivity",
        ...}], "balanced_accuracy": float, "balanced_accuracy_ci95": {...}}``; an interval
        is absent without resamples.
    """
    labels = np.asarray(labels)
    point = class_measures(labels, probabilities, predicted, np.ones((1, len(labels))))
    draws = (
        class_measures(labels, probabilities, predicted, patient_weights(groups, resamples, seed))
        if resamples > 0
        else None
    )
    rows = []
    for c, name in enumerate(classes):
        row: dict[str, Any] = {"class": str(name), "n": int((labels == c).sum())}
        for measure in MEASURES:
            row[measure] = float(point[measure][c, 0])
            if draws is not None:
                row[f"{measure}_ci95"] = _interval(draws[measure][c])
        rows.append(row)
    report: dict[str, Any] = {
        "classes": rows,
        "balanced_accuracy": float(point["balanced_accuracy"][0]),
    }
    if draws is not None:
        report["balanced_accuracy_ci95"] = _interval(draws["balanced_accuracy"])
    return report


def flat_metrics(report: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The table as flat MLflow metrics: ``{prefix}_balanced_accuracy`` (and ``_ci_low``/
    ``_ci_high``), and per class ``{prefix}_<measure>_class<i>`` by class index (class names
    are data and need not be valid metric names; the logged table names them)."""
    flat = _flat_value(f"{prefix}_balanced_accuracy", report, "balanced_accuracy")
    for i, row in enumerate(report.get("classes", ())):
        for measure in MEASURES:
            flat.update(_flat_value(f"{prefix}_{measure}_class{i}", row, measure))
    return flat


def table_columns(report: Mapping[str, Any]) -> dict[str, list]:
    """The table column-wise (``{"class": [...], "n": [...], "auc": [...], "auc_low": ...}``),
    the shape ``mlflow.log_table`` takes."""
    columns: dict[str, list] = {"class": [], "n": []}
    for row in report.get("classes", ()):
        columns["class"].append(row["class"])
        columns["n"].append(row["n"])
        for measure in MEASURES:
            ci = row.get(f"{measure}_ci95") or {}
            columns.setdefault(measure, []).append(row[measure])
            columns.setdefault(f"{measure}_low", []).append(ci.get("low", float("nan")))
            columns.setdefault(f"{measure}_high", []).append(ci.get("high", float("nan")))
    return columns


def _flat_value(key: str, source: Mapping[str, Any], name: str) -> dict[str, float]:
    flat = {key: float(source[name])}
    ci = source.get(f"{name}_ci95")
    if ci:
        flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = float(ci["low"]), float(ci["high"])
    return flat


def _interval(draws: np.ndarray) -> dict[str, float]:
    low, high = percentile_interval(draws)
    return {"low": low, "high": high}
