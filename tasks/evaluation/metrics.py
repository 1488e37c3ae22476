"""Classification metrics: ROC AUC, a threshold chosen on validation, calibration, confusion.

Pure functions of labels and predicted probabilities; no torch, no MLflow.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from tasks.errors import MedtransferError

THRESHOLD_RULES = ("youden", "spec@0.9", "0.5")


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC: binary on the positive-class probability, else one-vs-rest macro average.

    Returns NaN when only one class is present (AUC is undefined), instead of raising.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def choose_threshold(labels: np.ndarray, positive_scores: np.ndarray, rule: str) -> float:
    """A decision threshold on the positive-class probability, chosen on validation data.

    Args:
        labels: 0/1 validation labels.
        positive_scores: validation probabilities of class 1.
        rule: ``youden`` maximises sensitivity + specificity - 1; ``spec@0.9`` takes the most
            sensitive threshold whose specificity is at least 0.9; ``0.5`` is fixed.
    """
    if rule not in THRESHOLD_RULES:
        raise MedtransferError(f"eval.threshold must be one of {THRESHOLD_RULES}, not {rule!r}.")
    if rule == "0.5" or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, positive_scores)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # sklearn's first threshold is +inf
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    allowed = np.flatnonzero(1 - fpr >= 0.9)
    return float(thresholds[allowed[np.argmax(tpr[allowed])]])


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> float:
    """ECE of the top-class confidence over ``bins`` equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


@dataclass
class SplitMetrics:
    """Metrics of one split at one threshold."""

    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    ece: float
    threshold: float
    confusion: list[list[int]]

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Flat ``{prefix}_{name}`` metrics (the confusion matrix is left out)."""
        return {
            f"{prefix}_auc": self.auc,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_sensitivity": self.sensitivity,
            f"{prefix}_specificity": self.specificity,
            f"{prefix}_ece": self.ece,
        }


def predict_labels(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Class predictions: positive-class probability >= threshold for binary, else argmax."""
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def split_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> SplitMetrics:
    """All metrics of one split. Sensitivity/specificity are for class 1 (binary only; NaN otherwise)."""
    labels = np.asarray(labels)
    n_classes = probabilities.shape[1]
    predicted = predict_labels(probabilities, threshold)
    matrix = confusion_matrix(labels, predicted, labels=list(range(n_classes)))
    sensitivity = specificity = float("nan")
    if n_classes == 2:
        tn, fp, fn, tp = matrix.ravel()
        sensitivity = tp / (tp + fn) if tp + fn else float("nan")
        specificity = tn / (tn + fp) if tn + fp else float("nan")
    return SplitMetrics(
        auc=roc_auc(labels, probabilities),
        accuracy=float((predicted == labels).mean()),
        sensitivity=float(sensitivity),
        specificity=float(specificity),
        ece=expected_calibration_error(labels, probabilities),
        threshold=float(threshold),
        confusion=matrix.tolist(),
    )
