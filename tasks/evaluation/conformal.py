"""Split conformal prediction sets: "the true class is in this set with probability 0.95".

Calibrated on the validation split (never seen by the weights; the temperature was fitted on
it too, which keeps the scores exchangeable with new images' since the temperature is fixed
before any test or served image), measured on the test split, applied to every served image
(:func:`tasks.model.inference.prediction_set`, with the quantile recorded at packaging).
The score and the set rule belong to the label kind
(:meth:`tasks.model.label_kind.SingleLabel.conformal_scores` and ``prediction_sets``: APS,
randomised by a draw taken from each image's own hash, so that coverage is exact rather than
conservative and one image still always gets one set); this
module is the part every kind shares: the finite-sample quantile, and coverage with its Wilson
interval and the mean set size.

Written here rather than taken from MAPIE, crepes or TorchCP (MAPIE 1.6 and crepes 0.9 install
cleanly against our pins): each wraps a fitted scikit-learn or torch model, while the served
student needs one number, the calibrated quantile, applied to probabilities it already has;
reading that number out of their fitted objects means private attributes, and a library in
the Bento for some fifteen lines of arithmetic. The guarantee (Vovk et al. 2005; Angelopoulos
and Bates 2021, eq. 1): with ``n`` calibration scores and ``k = ceil((n + 1)(1 - alpha))``,
the ``k``-th smallest score bounds a new exchangeable image's score with probability at least
``1 - alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.evaluation.metrics import wilson_interval
from tasks.model.label_kind import SINGLE_LABEL, SingleLabel, image_uniforms

if TYPE_CHECKING:
    from tasks.data.dataset import ProcessedDataset

METHOD = "aps"
# The quantile when the calibration set is too small for the coverage asked
# (k > n): above any APS score (at most 1), so every class is in every set.
EVERY_CLASS = 2.0


@dataclass(frozen=True)
class ConformalCalibration:
    """A calibrated set rule.

    Attributes:
        coverage: the nominal coverage ``1 - alpha`` (``serving.coverage``).
        threshold: the calibrated quantile of the scores (:data:`EVERY_CLASS` when the
            calibration set is too small to bound them).
        n_calibration: the calibration (validation) images it was computed on.
        method: the score, ``aps``.
    """

    coverage: float
    threshold: float
    n_calibration: int
    method: str = METHOD

    def sets(
        self,
        probabilities: np.ndarray,
        u: np.ndarray | None = None,
        kind: SingleLabel = SINGLE_LABEL,
    ) -> np.ndarray:
        """The prediction sets ``(N, C)`` bool of probabilities ``(N, C)``, with each image's
        draw ``u`` ``(N,)`` (:func:`tasks.model.label_kind.image_uniforms`)."""
        return kind.prediction_sets(probabilities, self.threshold, u)


def split_uniforms(dataset: ProcessedDataset) -> dict[str, np.ndarray]:
    """Each val and test image's score draw ``(n,)`` from its ``image_sha256``
    (:func:`tasks.model.label_kind.image_uniforms`), as the service draws from its upload."""
    digests = dataset.manifest["image_sha256"].to_numpy()
    return {split: image_uniforms(digests[dataset.indices(split)]) for split in ("val", "test")}


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ``ceil((n + 1) * coverage)``-th smallest of ``scores`` ``(n,)``, or
    :data:`EVERY_CLASS` when that rank exceeds ``n``."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    # the small epsilon keeps 20 * 0.95 at rank 19 whatever the float rounding
    rank = math.ceil((len(scores) + 1) * coverage - 1e-9)
    if rank > len(scores) or rank < 1:
        return EVERY_CLASS
    return float(scores[rank - 1])


def calibrate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    u: np.ndarray | None = None,
    kind: SingleLabel = SINGLE_LABEL,
) -> ConformalCalibration:
    """The set rule at ``coverage`` from calibration probabilities ``(N, C)``, labels
    ``(N,)`` (the validation split) and each image's draw ``u`` ``(N,)`` (None: the
    conservative, non-randomised score)."""
    scores = kind.conformal_scores(probabilities, labels, u)
    return ConformalCalibration(
        coverage=float(coverage),
        threshold=conformal_quantile(scores, coverage),
        n_calibration=len(scores),
    )


@dataclass(frozen=True)
class SetCoverage:
    """How the sets did on labelled images: ``covered`` of ``n`` sets held the true class
    (``rate`` with its 95% Wilson ``interval``), with ``mean_size`` classes on average."""

    n: int
    covered: int
    rate: float
    interval: tuple[float, float]
    mean_size: float

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "covered": self.covered,
            "coverage": self.rate,
            "ci95": {"low": self.interval[0], "high": self.interval[1]},
            "mean_set_size": self.mean_size,
        }


def measure(sets: np.ndarray, labels: np.ndarray) -> SetCoverage:
    """Coverage of sets ``(N, C)`` bool against labels ``(N,)``."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    covered = int(sets[np.arange(n), labels].sum()) if n else 0
    return SetCoverage(
        n=n,
        covered=covered,
        rate=covered / n if n else float("nan"),
        interval=wilson_interval(covered, n),
        mean_size=float(sets.sum(axis=1).mean()) if n else float("nan"),
    )


def conformal_report(calibration: ConformalCalibration, test: SetCoverage) -> dict:
    """The report block: the rule (method, nominal coverage, quantile, calibration size) and
    the test split's coverage with its interval and the mean set size."""
    return {
        "method": calibration.method,
        "coverage": calibration.coverage,
        "threshold": calibration.threshold,
        "n_calibration": calibration.n_calibration,
        "calibrated_on": "val",
        "test": test.to_dict(),
    }


def report_metrics(block: dict, prefix: str) -> dict[str, float]:
    """A :func:`conformal_report` block's test figures as flat MLflow metrics named
    ``<prefix>coverage_nominal``, ``<prefix>test_coverage`` (with ``_ci_low``/``_ci_high``),
    ``<prefix>threshold`` and ``<prefix>test_mean_set_size``; non-finite values are left out
    (MLflow stores NaN, but a chart of it says nothing)."""
    test = block["test"]
    flat = {
        "coverage_nominal": block["coverage"],
        "threshold": block["threshold"],
        "test_coverage": test["coverage"],
        "test_coverage_ci_low": test["ci95"]["low"],
        "test_coverage_ci_high": test["ci95"]["high"],
        "test_mean_set_size": test["mean_set_size"],
    }
    return {
        prefix + key: float(value)
        for key, value in flat.items()
        if value is not None and np.isfinite(value)
    }
