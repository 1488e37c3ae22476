"""Classification metrics: ROC AUC, a threshold chosen on validation, calibration, confusion.

Pure functions of labels and predicted probabilities; no torch, no MLflow.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from tasks.errors import MedtransferError
from tasks.model.label_kind import SINGLE_LABEL

THRESHOLD_RULES = ("youden", "spec@0.9", "0.5")


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC: binary on the positive-class probability, else one-vs-rest macro average.

    Returns NaN when only one class is present (AUC is undefined), instead of raising. With
    more than two classes, a class absent from ``labels`` (a small validation split missing a
    rare class) is left out of the macro mean (:func:`weighted_auc`), where scikit-learn's
    ``roc_auc_score`` raises; with every class present the two agree.
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(binary_auc(labels, probabilities[:, 1]))
    return float(weighted_auc(labels, probabilities, np.ones((1, len(labels))))[0])


def binary_auc(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> float | np.ndarray:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counting 1/2; the
    same number as ``roc_auc_score`` on ``labels == 1``.

    Args:
        labels: ``(N,)`` 0/1 (1 is positive); scores: ``(N,)`` positive-class scores.
        weights: ``(B, N)`` image counts per row (a bootstrap's draws), or None for each
            image once.

    Returns:
        A float without ``weights``, else ``(B,)``, one AUC per row; NaN where a row has no
        positive or no negative. O(B * N) after one sort, so it serves the test set's AUC and
        a thousand bootstrap rows alike.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    rows = np.ones((1, len(labels))) if weights is None else np.asarray(weights, np.float64)
    positive = labels == 1
    # Each row's negative weight at each distinct score, then the weight strictly below it.
    distinct, level = np.unique(scores, return_inverse=True)
    negative_at = np.zeros((len(distinct), len(rows)))
    np.add.at(negative_at, level[~positive], rows[:, ~positive].T)
    below = np.cumsum(negative_at, axis=0) - negative_at
    beaten = below[level[positive]] + 0.5 * negative_at[level[positive]]  # (P, B)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.einsum("bp,pb->b", rows[:, positive], beaten) / (
            rows[:, positive].sum(1) * rows[:, ~positive].sum(1)
        )
    return float(auc[0]) if weights is None else auc


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
    confidence = SINGLE_LABEL.confidence(probabilities)
    correct = SINGLE_LABEL.top_class(probabilities) == labels
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
    """Class predictions: positive-class probability >= threshold for binary, else argmax
    (the label kind's decision rule, :meth:`SingleLabel.decide`)."""
    return SINGLE_LABEL.decide(probabilities, threshold)


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


# --------------------------------------------------------------------------------------------
# intervals

# The metrics that carry a bootstrap interval, in report order.
INTERVAL_METRICS = SINGLE_LABEL.metrics
CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``successes / n``; (nan, nan) when n = 0.

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps its
    coverage at 0 or n successes, which is where robust accuracies live. With no trials there
    is no proportion (the share beside it is NaN too), so no interval: NaN, written as null in
    a report, and failing any gate that compares it, rather than a (0, 1) that reads as
    measured.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def patient_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap weights ``(resamples, N)``: each row draws the patients (``groups``, one id per
    image) with replacement, and every image counts as often as its patient was drawn.

    Resampling patients, not images, because images of one patient are not independent: the
    split is patient-level, so the patient is the unit of sampling.
    """
    _, patient_of_image = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = int(patient_of_image.max()) + 1 if len(patient_of_image) else 0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=resamples)
    return counts[:, patient_of_image].astype(np.float64)


def stratified_weights(strata: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap weights ``(resamples, N)`` that redraw the images of each stratum (e.g. each
    class, one value per image in ``strata``) with replacement, keeping every stratum's size."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(strata)))
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        counts = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), resamples)
        weights[:, members] = counts
    return weights


def percentile_interval(draws: np.ndarray) -> tuple[float, float]:
    """The :data:`CONFIDENCE` percentile interval of bootstrap ``draws`` ``(B,)``, over the
    finite ones (a row that cannot define the metric is NaN); (nan, nan) when none is."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(draws, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return float(low), float(high)


def weighted_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """:func:`split_metrics`' AUC, accuracy, sensitivity, specificity and ECE for each row of
    ``weights`` ``(B, N)`` (image ``i`` counted ``weights[b, i]`` times); each value ``(B,)``.

    Equal to :func:`split_metrics` on the images repeated by their weights, computed for all
    rows at once. Sensitivity/specificity are NaN for more than two classes; a metric a row
    cannot define (e.g. AUC with one class drawn) is NaN in that row.
    """
    labels = np.asarray(labels)
    predicted = predict_labels(probabilities, threshold)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {"accuracy": weights @ (predicted == labels) / total}
        if probabilities.shape[1] == 2:
            pos, neg = labels == 1, labels == 0
            result["sensitivity"] = weights[:, pos] @ (predicted[pos] == 1) / weights[:, pos].sum(1)
            result["specificity"] = weights[:, neg] @ (predicted[neg] == 0) / weights[:, neg].sum(1)
        else:
            nan = np.full(len(weights), np.nan)
            result["sensitivity"] = result["specificity"] = nan
        result["auc"] = weighted_auc(labels, probabilities, weights)
        result["ece"] = _weighted_ece(labels, probabilities, weights) / total
    return {name: result[name] for name in INTERVAL_METRICS}


def weighted_auc(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`roc_auc` per row of ``weights`` ``(B, N)``: ``(B,)``, in one pass per class.

    Binary: :func:`binary_auc` of the positive class. More classes: the mean of each class's
    one-vs-rest :func:`binary_auc` (what ``roc_auc_score(..., multi_class="ovr",
    average="macro")`` computes), over the classes a row can score: a patient resample of a
    small test split may draw no image of some class, which leaves that class out of the row's
    mean rather than making the row fail (NaN only when no class can be scored).
    """
    if probabilities.shape[1] == 2:
        return binary_auc(labels, probabilities[:, 1], weights)
    labels = np.asarray(labels)
    per_class = np.stack(
        [
            binary_auc((labels == c).astype(np.int64), probabilities[:, c], weights)
            for c in range(probabilities.shape[1])
        ]
    )
    scored = np.isfinite(per_class)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scored, per_class, 0.0).sum(axis=0) / scored.sum(axis=0)


def _weighted_ece(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``total weight * ECE`` per weight row, with :func:`expected_calibration_error`'s bins."""
    confidence = SINGLE_LABEL.confidence(probabilities)
    correct = (SINGLE_LABEL.top_class(probabilities) == labels).astype(np.float64)
    bins = 10
    # bin k holds (k/bins, (k+1)/bins]; confidence 0 cannot occur for a top-class probability
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    member = np.eye(bins)[index]  # (N, bins)
    gap = weights @ (member * correct[:, None]) - weights @ (member * confidence[:, None])
    return np.abs(gap).sum(axis=1)


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    groups: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of :data:`INTERVAL_METRICS` by bootstrap over patients.

    Args:
        labels: ``(N,)`` class indices; probabilities: ``(N, C)``.
        threshold: the decision threshold, fixed (chosen on validation, not per resample).
        groups: ``(N,)`` patient id of each image.
        resamples: bootstrap draws; seed: their seed.

    Returns:
        ``{metric: (low, high)}``; (nan, nan) where no resample defines the metric.
    """
    weights = patient_weights(groups, resamples, seed)
    values = weighted_metrics(labels, probabilities, threshold, weights)
    return {name: percentile_interval(draws) for name, draws in values.items()}


# --------------------------------------------------------------------------------------------
# calibration


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log(p) / T)``, ``(N, C)`` float32 (the label
    kind's :meth:`~tasks.model.label_kind.SingleLabel.rescale`).

    ``log p`` equals the logits up to a per-row constant, which softmax ignores, so this is
    ``softmax(logits / T)`` without needing the logits.
    """
    return SINGLE_LABEL.rescale(probabilities, temperature)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising the negative log-likelihood of ``labels``
    under :func:`apply_temperature` (Guo et al., ICML 2017): fitted on validation."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, 1.0))

    def nll(log_t: float) -> float:
        return SINGLE_LABEL.log_loss(log_p, labels, np.exp(log_t))

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


def reliability_curve(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> list[dict[str, float]]:
    """Per non-empty confidence bin: mean confidence, accuracy and image count (the points of a
    reliability diagram, with :func:`expected_calibration_error`'s bins)."""
    confidence = SINGLE_LABEL.confidence(probabilities)
    correct = SINGLE_LABEL.top_class(probabilities) == np.asarray(labels)
    points = []
    for low, high in itertools.pairwise(np.linspace(0.0, 1.0, bins + 1)):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            points.append(
                {
                    "confidence": float(confidence[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                    "n": int(in_bin.sum()),
                }
            )
    return points
