"""The kind of label a model predicts: its loss, output activation, decision rule and metrics.

Every label today is one class index per image (:data:`SINGLE_LABEL`): the loss is
cross-entropy, the output a softmax over the classes, the decision the top class (for two
classes, the positive probability against a threshold chosen on validation), and the metrics
ROC AUC, accuracy, sensitivity/specificity and ECE. Code that trains, evaluates or serves asks
this object instead of writing ``CrossEntropyLoss``, ``softmax`` or ``argmax`` itself, so that a
second kind (several labels per image: a sigmoid per label, binary cross-entropy, a threshold
per label) is one more class here rather than an edit in every file.

The decision half (the decision, top class, confidence, calibration's temperature
rescaling and log loss, and the conformal prediction sets' scores and sets) works on numpy arrays and imports no torch
(:mod:`tasks.evaluation.metrics` and the serving API use it); the training half (loss,
activation) imports torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class SingleLabel:
    """One class per image: labels ``(N,)`` class indices, outputs ``(N, C)``."""

    name: str = "single-label"
    # The metrics each split reports with a bootstrap interval, in report order.
    metrics: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "ece")

    def loss(self, class_weights: torch.Tensor | None = None, reduction: str = "mean") -> nn.Module:
        """Cross-entropy on logits ``(N, C)`` against class indices ``(N,)``, each class's
        terms weighted by ``class_weights`` ``(C,)`` when given."""
        from torch import nn  # deferred: the decision half serves numpy-only callers

        return nn.CrossEntropyLoss(weight=class_weights, reduction=reduction)

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Class probabilities ``(N, C)`` float32: ``softmax(logits / temperature)`` (the
        student's calibration; 1.0 for the raw output)."""
        import torch  # deferred: the decision half serves numpy-only callers

        return torch.softmax(logits.float() / float(temperature), dim=1)

    def rescale(self, probabilities: np.ndarray, temperature: float) -> np.ndarray:
        """Temperature-scaled probabilities ``softmax(log(p) / T)``, ``(N, C)`` float32, on
        numpy: :meth:`probabilities` at ``temperature`` from probabilities instead of logits
        (``log p`` equals the logits up to a per-row constant, which the softmax ignores)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if temperature == 1.0:
            return probabilities.astype(np.float32)
        logits = np.log(np.clip(probabilities, 1e-30, 1.0)) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        scaled = np.exp(logits)
        return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)

    def log_loss(
        self, log_probabilities: np.ndarray, labels: np.ndarray, temperature: float
    ) -> float:
        """The mean negative log-likelihood of ``labels`` ``(N,)`` under :meth:`rescale` at
        ``temperature``, from ``log p`` ``(N, C)`` float64 (the loss on numpy: what a fitted
        temperature minimises)."""
        z = log_probabilities / temperature
        z -= z.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(len(labels)), labels].mean())

    def decide(self, probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
        """Predicted classes ``(N,)`` int64: for two classes, positive probability >=
        ``threshold``; for more, or with no threshold (None: none was chosen), the top class
        (``threshold`` unused)."""
        if probabilities.shape[1] == 2 and threshold is not None:
            return (probabilities[:, 1] >= threshold).astype(np.int64)
        return probabilities.argmax(axis=1)

    def top_class(self, probabilities: np.ndarray) -> np.ndarray:
        """The most probable class of each row ``(N,)`` int64: what accuracy and calibration
        score (whatever the threshold). Logits ``(N, C)`` give the same classes (the softmax
        keeps each row's order), as do any per-class scores (a kNN's votes)."""
        return probabilities.argmax(axis=1)

    def confidence(self, probabilities: np.ndarray) -> np.ndarray:
        """The top class's probability ``(N,)``: the confidence calibration is measured on."""
        return probabilities.max(axis=1)

    def conformal_scores(
        self, probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray | None = None
    ) -> np.ndarray:
        """Randomised APS nonconformity scores ``(N,)`` float64 (Romano et al., NeurIPS 2020):
        the probability of the classes more probable than the true one (``labels`` ``(N,)``)
        plus ``u`` ``(N,)`` in [0, 1) times the true class's own: 0.6 + 0.5 * 0.3 = 0.75 for
        ``p = (0.6, 0.3, 0.1)``, label 1 and ``u`` 0.5. ``u`` None is 1 (the conservative,
        non-randomised score). The draw is what makes coverage exact rather than conservative:
        without it a binary model's sets jump from one class to both."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        true = probabilities[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
        above = (probabilities * (probabilities > true[:, None])).sum(axis=1)
        return above + (1.0 if u is None else np.asarray(u, dtype=np.float64)) * true

    def prediction_sets(
        self, probabilities: np.ndarray, threshold: float, u: np.ndarray | None = None
    ) -> np.ndarray:
        """Split-conformal sets ``(N, C)`` bool: class ``k`` is in row ``i``'s set when
        :meth:`conformal_scores` of ``(i, k)`` with the same ``u[i]`` is at most ``threshold``
        (the calibrated quantile, :func:`tasks.evaluation.conformal.calibrate`), and the top
        class always is.

        The top class is added where no class passes (a ``threshold`` below its score): a set
        can only grow, so coverage stays at least the nominal level, and a reply never names
        an empty set. ``u`` comes from each image's own bytes (:func:`image_uniforms`), so
        one image gets one set, every time it is sent.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        draw = np.ones(len(probabilities)) if u is None else np.asarray(u, dtype=np.float64)
        # above[i, k]: the mass of row i's classes more probable than class k, (N, C)
        more = probabilities[:, None, :] > probabilities[:, :, None]
        above = (probabilities[:, None, :] * more).sum(axis=2)
        sets = above + draw[:, None] * probabilities <= threshold
        sets[np.arange(len(probabilities)), probabilities.argmax(axis=1)] = True
        return sets


def image_uniforms(sha256_hex: list[str] | np.ndarray) -> np.ndarray:
    """One draw in [0, 1) per image ``(N,)`` from its SHA-256 (hex; the manifest's
    ``image_sha256`` of the model-ready uint8 image): the randomised APS score's ``u``.
    Independent of the label, as the score needs, and the same every time for one image, so
    evaluation, packaging and the service give an image one set."""
    return np.array([int(str(h)[:13], 16) / 16.0**13 for h in sha256_hex], dtype=np.float64)


SINGLE_LABEL = SingleLabel()


@dataclass(frozen=True)
class MultiLabel:
    """Several findings per image, each present or not: labels ``(N, K)`` 0/1 (NaN where a
    finding is unknown and left out), outputs ``(N, K)``, one independent sigmoid per finding.

    The decision is per finding, each against its own threshold (chosen on validation); so is
    calibration (one temperature per finding). ``thresholds`` and ``temperatures`` are
    ``(K,)`` arrays, or a scalar applied to every finding.
    """

    name: str = "multi-label"
    # The figures each finding reports with a bootstrap interval, in report order.
    metrics: tuple[str, ...] = ("auc", "sensitivity", "specificity")

    def loss(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean") -> nn.Module:
        """Binary cross-entropy on logits ``(N, K)`` against 0/1 labels ``(N, K)`` float over
        the known cells (a NaN label is left out:
        :class:`tasks.model.masked_bce.MaskedBCEWithLogitsLoss`), each finding's positive
        terms weighted by ``pos_weight`` ``(K,)`` when given (negatives / positives of the
        training split: :func:`positive_weights`)."""
        # deferred: the decision half serves numpy-only callers
        from tasks.model.masked_bce import MaskedBCEWithLogitsLoss

        return MaskedBCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction)

    def probabilities(self, logits: torch.Tensor, temperature=1.0) -> torch.Tensor:
        """Each finding's probability ``(N, K)`` float32: ``sigmoid(logits / T)``, ``T`` a
        scalar or one temperature per finding ``(K,)``."""
        import torch  # deferred: the decision half serves numpy-only callers

        scale = torch.as_tensor(temperature, dtype=torch.float32)
        return torch.sigmoid(logits.float() / scale)

    def rescale(self, probabilities: np.ndarray, temperature) -> np.ndarray:
        """:meth:`probabilities` at ``temperature`` from probabilities ``(N, K)`` instead of
        logits (the logit of ``p`` is the logit), float32."""
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
        logits = np.log(p) - np.log1p(-p)
        return (1.0 / (1.0 + np.exp(-logits / np.asarray(temperature)))).astype(np.float32)

    def log_loss(self, logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
        """The mean binary cross-entropy of one finding's 0/1 ``labels`` ``(N,)`` under
        ``sigmoid(logits / T)``, ``logits`` ``(N,)`` float64 (what that finding's fitted
        temperature minimises)."""
        z = np.asarray(logits, dtype=np.float64) / temperature
        # -log sigmoid(z) = log(1 + e^-z), written stably for both signs
        return float(np.mean(np.logaddexp(0.0, -z) * labels + np.logaddexp(0.0, z) * (1 - labels)))

    def decide(self, probabilities: np.ndarray, threshold) -> np.ndarray:
        """Each finding present or not ``(N, K)`` int64: its probability >= its threshold
        (``(K,)``, or one for all; None: 0.5)."""
        threshold = 0.5 if threshold is None else np.asarray(threshold, dtype=np.float64)
        return (np.asarray(probabilities) >= threshold).astype(np.int64)


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """BCE's ``pos_weight`` per finding ``(K,)`` float32 from training labels ``(N, K)``:
    negatives / positives among the images where the finding is known (NaN is unknown), so a
    rare finding's positives weigh as much as its negatives; 1 where a finding has no
    positive or no negative (nothing to balance)."""
    labels = np.asarray(labels, dtype=np.float64)
    positives = np.nansum(labels == 1, axis=0).astype(np.float64)
    negatives = np.nansum(labels == 0, axis=0).astype(np.float64)
    weights = np.ones(labels.shape[1])
    both = (positives > 0) & (negatives > 0)
    weights[both] = negatives[both] / positives[both]
    return weights.astype(np.float32)


MULTI_LABEL = MultiLabel()

# Every kind by the name a processed dataset (dataset.json ``label_kind``) and a saved student
# (StudentSpec.label_kind) record; absent means single-label, what everything before read as.
KINDS: dict[str, SingleLabel | MultiLabel] = {k.name: k for k in (SINGLE_LABEL, MULTI_LABEL)}


def kind_named(name: str | None) -> SingleLabel | MultiLabel:
    """The label kind called ``name`` (None: single-label); a ValueError for another name."""
    if name is None:
        return SINGLE_LABEL
    if name not in KINDS:
        raise ValueError(f"unknown label kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def kind_of_labels(labels: np.ndarray) -> SingleLabel | MultiLabel:
    """The kind a label array is of: ``(N, K)`` findings are multi-label, ``(N,)`` class
    indices single-label (what training, which gets the arrays, dispatches on)."""
    return MULTI_LABEL if np.ndim(labels) == 2 else SINGLE_LABEL
