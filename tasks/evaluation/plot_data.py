"""DVC plots as data: the points behind the figures, as JSON files DVC's templates draw.

``dvc plots show`` renders them and ``dvc plots diff`` overlays two experiments; the PNG
figures stay for MLflow. Each file is a JSON list of flat rows (DVC's tabular plot format),
written atomically under ``<reports_dir>/plots/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from tasks import atomic, reports

ROC = "roc_test.json"
CONFUSION = "confusion_test.json"
RELIABILITY = "reliability_test.json"
ROBUSTNESS = "robustness_curves.json"
HISTORY = "train_history.json"
# The test figures per group (tasks.evaluation.group_metrics.group_rows); the model card's table
GROUPS = "groups_test.json"


def write_rows(reports_dir: str | Path, name: str, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write ``rows`` as a JSON list to ``<reports_dir>/plots/<name>``; returns the path."""
    path = reports.plot_path(reports_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(reports.as_json(list(rows)), indent=1)
    return atomic.write_file(path, lambda partial: partial.write_text(text))


def roc_rows(labels: np.ndarray, positive_scores: np.ndarray) -> list[dict[str, float]]:
    """ROC points ``{fpr, tpr, threshold}`` of binary scores (empty with one class)."""
    if len(np.unique(labels)) < 2:
        return []
    fpr, tpr, thresholds = roc_curve(labels, positive_scores)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(min(h, 1.0))}
        for f, t, h in zip(fpr, tpr, thresholds, strict=True)
    ]


# The columns of the training history's plot data (DVC overlays them across experiments).
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr")


def history_rows(
    history: Sequence[Mapping[str, float]], strategy: str, fraction: float
) -> list[dict[str, object]]:
    """One row per epoch of a fit's ``history`` (``FitResult.history``, resumed epochs
    included), with its strategy and label fraction: the points of ``train_history.json``."""
    return [
        {
            "strategy": strategy,
            "fraction": fraction,
            **{key: row[key] for key in HISTORY_COLUMNS if key in row},
        }
        for row in history
    ]


def confusion_rows(
    labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]
) -> list[dict[str, str]]:
    """One row ``{actual, predicted}`` per image, by class name (DVC's confusion template)."""
    return [
        {"actual": classes[int(a)], "predicted": classes[int(p)]}
        for a, p in zip(labels, predicted, strict=True)
    ]


def write_evaluation_plots(reports_dir: str | Path, evaluation, classes: Sequence[str]) -> None:
    """ROC (two classes: the positive one; more: each class against the rest, rows with its
    ``class``), confusion and reliability (before and after calibration) of the test split."""
    from tasks.evaluation.metrics import predict_labels, reliability_curve

    labels = evaluation.labels["test"]
    probabilities = evaluation.probabilities["test"]
    if probabilities.shape[1] == 2:
        write_rows(reports_dir, ROC, roc_rows(labels, probabilities[:, 1]))
    else:  # each class against the rest, one curve per class
        rows = [
            {"class": name, **point}
            for c, name in enumerate(classes)
            for point in roc_rows((labels == c).astype(np.int64), probabilities[:, c])
        ]
        write_rows(reports_dir, ROC, rows)
    predicted = predict_labels(probabilities, evaluation.threshold)
    write_rows(reports_dir, CONFUSION, confusion_rows(labels, predicted, classes))
    reliability = [
        {**point, "calibration": name}
        for name, probs in (
            ("uncalibrated", evaluation.raw_probabilities.get("test", probabilities)),
            ("calibrated", probabilities),
        )
        for point in reliability_curve(labels, probs)
    ]
    write_rows(reports_dir, RELIABILITY, reliability)
