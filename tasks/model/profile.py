"""The training data's profile, recorded with the model: what the service may answer for.

Packaging (:mod:`tasks.registry.profile_fit`) writes two files next to ``model.pt``:

- ``profile.json``: the DICOM metadata the training files had (:data:`SCOPE_KEYWORDS`; a
  value outside it is ``out_of_scope``), the multi-frame rule ingestion used, deciles of three
  image statistics (and of the same per channel for a colour model, :func:`statistic_names`), of the OOD score and of the positive-class probability on the training and
  validation splits (the drift monitor's reference), and the OOD detector's settings and
  threshold.
- ``ood.npz``: the detector's arrays (reference features, class means, precision, head).

The service loads both with :meth:`DataProfile.load`. Every number here describes the training
data as a whole; nothing identifies an image or a patient.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROFILE_FILE = "profile.json"
OOD_FILE = "ood.npz"
# The header attributes the scope gate compares (upper-cased, stripped; "" when absent).
SCOPE_KEYWORDS = ("Modality", "PhotometricInterpretation", "BodyPartExamined")
# Per-image statistics of the model's uint8 input, kept per request for drift monitoring.
STATISTICS = ("mean", "std", "saturated")
# A colour image's channels, in its order: its statistics are also kept per channel.
COLOUR_CHANNELS = ("r", "g", "b")
KNN_K = 5
# Shrinkage of the shared covariance towards its mean variance (Mahalanobis).
SHRINKAGE = 0.1


def statistic_names(channels: int) -> tuple[str, ...]:
    """The names of :func:`image_statistics`' columns for images of ``channels`` channels:
    :data:`STATISTICS` (over every pixel value), then for colour the same per channel
    (``mean_r``, ``std_r``, ``saturated_r``, ``mean_g``, ..., ``saturated_b``)."""
    if channels == 1:
        return STATISTICS
    per_channel = (f"{name}_{c}" for c in COLOUR_CHANNELS[:channels] for name in STATISTICS)
    return (*STATISTICS, *per_channel)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(B, S, S)`` → float64 ``(B, 3)``: mean and standard deviation of the
    pixel values / 255, and the share of pixels at 0 or 255. Colour images ``(B, C, S, S)``
    → ``(B, 3 + 3C)``: the same over every value, then per channel
    (:func:`statistic_names`): a colour shift (a camera's white balance, channels swapped)
    can leave the pooled figures where they were."""
    images = np.asarray(images)
    columns = [_statistics(images.reshape(len(images), -1))]
    if images.ndim == 4:
        columns += [
            _statistics(images[:, c].reshape(len(images), -1)) for c in range(images.shape[1])
        ]
    return np.concatenate(columns, axis=1)


def _statistics(flat: np.ndarray) -> np.ndarray:
    """uint8 values ``(B, P)`` → ``(B, 3)``: mean, standard deviation / 255, saturated share."""
    flat = np.asarray(flat, dtype=np.float64) / 255.0
    saturated = ((flat <= 0.0) | (flat >= 1.0)).mean(axis=1)
    return np.stack([flat.mean(axis=1), flat.std(axis=1), saturated], axis=1)


def header_values(ds) -> dict[str, str]:
    """The :data:`SCOPE_KEYWORDS` of a pydicom dataset, upper-cased ("" when absent or
    unreadable)."""
    values = {}
    for keyword in SCOPE_KEYWORDS:
        try:
            values[keyword] = str(ds.get(keyword, "") or "").strip().upper()
        except Exception:  # a malformed value is as good as none
            values[keyword] = ""
    return values


@dataclass(frozen=True)
class Scope:
    """Header values seen in training, per keyword (sorted; "" means some file lacked it)."""

    allowed: dict[str, list[str]]

    def violation(self, values: dict[str, str]) -> str | None:
        """A message naming what was expected, or None when ``values`` are in scope.

        The message quotes only the training data's values, never the upload's.
        """
        for keyword, allowed in self.allowed.items():
            if allowed and values.get(keyword, "") not in allowed:
                shown = ", ".join(v or "(absent)" for v in allowed)
                return f" The model was trained on {keyword} {shown} only."
        return None


class OodDetector:
    """An out-of-distribution score on the student's penultimate features ``(B, D)``.

    ``knn``: cosine distance to the :data:`KNN_K`-th nearest training feature. ``mahalanobis``:
    the smallest Mahalanobis distance to a class mean under the shared, shrunk covariance.
    ``energy``: ``-logsumexp`` of the head's logits. Larger is more unusual; at or above
    ``threshold`` the service abstains.
    """

    def __init__(self, method: str, arrays: dict[str, np.ndarray], threshold: float) -> None:
        self.method = method
        self.arrays = arrays
        self.threshold = threshold

    @classmethod
    def fit(cls, method: str, features: np.ndarray, labels: np.ndarray, head) -> OodDetector:
        """Fit on training features ``(N, D)`` and labels ``(N,)``; ``head`` is
        ``(weight (C, D), bias (C,))``. The threshold is set later (:meth:`calibrate`)."""
        features = np.asarray(features, dtype=np.float64)
        arrays: dict[str, np.ndarray] = {}
        if method == "knn":
            arrays["reference"] = _normalise(features).astype(np.float32)
        elif method == "mahalanobis":
            classes = np.unique(labels)
            means = np.stack([features[labels == c].mean(axis=0) for c in classes])
            centred = features - means[np.searchsorted(classes, labels)]
            cov = centred.T @ centred / max(len(features) - 1, 1)
            scale = np.trace(cov) / cov.shape[0]
            cov = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * np.eye(cov.shape[0])
            arrays["means"] = means.astype(np.float32)
            arrays["precision"] = np.linalg.inv(cov).astype(np.float32)
        elif method == "energy":
            arrays["weight"] = np.asarray(head[0], dtype=np.float32)
            arrays["bias"] = np.asarray(head[1], dtype=np.float32)
        else:
            raise ValueError(f"unknown OOD method {method!r}")
        return cls(method, arrays, threshold=float("inf"))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Features ``(B, D)`` → scores ``(B,)`` float64."""
        features = np.asarray(features, dtype=np.float64)
        if self.method == "knn":
            similarity = _normalise(features) @ self.arrays["reference"].T.astype(np.float64)
            k = min(KNN_K, similarity.shape[1])
            kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
            return 1.0 - kth
        if self.method == "mahalanobis":
            precision = self.arrays["precision"].astype(np.float64)
            distances = []
            for mean in self.arrays["means"].astype(np.float64):
                delta = features - mean
                distances.append(np.einsum("bd,de,be->b", delta, precision, delta))
            return np.sqrt(np.maximum(np.min(distances, axis=0), 0.0))
        logits = features @ self.arrays["weight"].T.astype(np.float64) + self.arrays["bias"]
        top = logits.max(axis=1)
        return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))

    def calibrate(self, validation_scores: np.ndarray, false_rejection: float) -> None:
        """Threshold at the conformal ``1 - false_rejection`` quantile of ``n`` validation
        scores (the ``ceil((n + 1)(1 - false_rejection))``-th smallest): a new image from the
        same distribution is refused with probability at most ``false_rejection``. The plain
        quantile refused 11-12% of held-back images at 5% (benchmarks/results/ood.md)."""
        scores = np.sort(np.asarray(validation_scores, dtype=np.float64))
        rank = int(np.ceil((len(scores) + 1) * (1.0 - false_rejection)))
        # Fewer scores than the rate can resolve: refuse only what is above all of them.
        self.threshold = float(scores[min(rank, len(scores)) - 1] + (rank > len(scores)) * 1e-9)

    def save(self, folder: Path) -> None:
        np.savez(folder / OOD_FILE, **self.arrays)

    @classmethod
    def load(cls, folder: Path, method: str, threshold: float) -> OodDetector:
        with np.load(folder / OOD_FILE) as stored:
            arrays = {key: stored[key] for key in stored.files}
        return cls(method, arrays, threshold)


def _normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass
class DataProfile:
    """The content of ``profile.json`` plus the loaded detector (see the module docstring)."""

    scope: dict[str, list[str]] | None
    multiframe: str
    source_kind: str
    n_train: int
    n_val: int
    statistics: dict[str, list[float]]
    ood: dict
    probability_deciles: list[float]
    # More than two classes, or findings: one decile list per class (finding) column, and
    # probability_deciles empty. Empty for two classes and in profiles saved before it existed.
    class_probability_deciles: list[list[float]] = field(default_factory=list)
    detector: OodDetector | None = None

    def scope_gate(self) -> Scope | None:
        return Scope(self.scope) if self.scope else None

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        record = {k: v for k, v in asdict(self).items() if k != "detector"}
        (folder / PROFILE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        if self.detector is not None:
            self.detector.save(folder)
        return folder / PROFILE_FILE

    @classmethod
    def load(cls, folder: str | Path) -> DataProfile | None:
        """The profile saved in ``folder``, or None when there is none (an older model)."""
        folder = Path(folder)
        if not (folder / PROFILE_FILE).is_file():
            return None
        record = json.loads((folder / PROFILE_FILE).read_text())
        profile = cls(**record)
        if (folder / OOD_FILE).is_file():
            profile.detector = OodDetector.load(
                folder, profile.ood["method"], profile.ood["threshold"]
            )
        return profile


def deciles(values: np.ndarray) -> list[float]:
    """The 10%, ..., 90% quantiles of ``values``: the bin edges the drift monitor uses."""
    return [
        float(q) for q in np.quantile(np.asarray(values, dtype=np.float64), np.arange(1, 10) / 10)
    ]


def features_and_probabilities(
    model, images: np.ndarray, temperature: float | tuple[float, ...], kind=None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(B, S, S)`` → (probabilities ``(B, C)``, penultimate features ``(B, D)``)
    in one forward pass; ``temperature`` is the student's calibration (``StudentSpec``),
    ``kind`` its label kind (``StudentSpec.kind``; None: single-label; multi-label: one
    sigmoid per finding).

    The probabilities come from :func:`tasks.model.predict.probabilities`, the one forward
    pass (so whatever it applies, e.g. calibration, applies here); the features are the input
    of the student's ``head``, caught on the way.
    """
    # deferred: tasks.model.predict imports torch, which the service's API process never needs
    from tasks.model.predict import probabilities

    caught: list = []
    handle = model.head.register_forward_hook(lambda m, inputs, out: caught.append(inputs[0]))
    try:
        probs = (
            probabilities(model, images, temperature)
            if kind is None
            else probabilities(model, images, temperature, kind)
        )
    finally:
        handle.remove()
    if not caught:
        return probs, np.zeros((len(images), 0), dtype=np.float32)
    return probs, caught[0].detach().float().numpy()
