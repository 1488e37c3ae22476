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
