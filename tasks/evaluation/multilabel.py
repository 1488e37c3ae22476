"""Figures of a multi-label model: several findings per image, each present or not.

Labels are ``(N, K)`` 0/1 floats, NaN where a finding is unknown (an uncertain CheXpert label
under the ``ignore`` policy): an unknown cell is left out of that finding's figures and of the
micro average, never counted as absent. Each finding gets its own temperature and its own
decision threshold, both chosen on validation; then, per finding, the AUC, and the sensitivity
and specificity at its threshold, each with a 95% patient-bootstrap interval, plus the macro
AUC (mean over findings) and the micro AUC (every known image-finding pair pooled). Pure numpy;
the bootstrap reuses :mod:`tasks.evaluation.metrics`' patient weights and Mann-Whitney AUC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.evaluation.metrics import (
    binary_auc,
    choose_threshold,
    patient_weights,
    percentile_interval,
)
from tasks.model.label_kind import MULTI_LABEL

# The per-finding measures, in report order (each also gets ``<name>_ci95``).
MEASURES = MULTI_LABEL.metrics


def fit_temperatures(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """One temperature per finding ``(K,)`` in [0.05, 20], each minimising that finding's
    binary cross-entropy on its known validation labels (1.0 for a finding with no known
    positive or no known negative: nothing to fit)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    logits = np.log(p) - np.log1p(-p)
    temperatures = np.ones(labels.shape[1])
    for k in range(labels.shape[1]):
        known = np.isfinite(labels[:, k])
        y, z = labels[known, k], logits[known, k]
        if len(np.unique(y)) < 2:
            continue
        best = minimize_scalar(
            lambda log_t, y=y, z=z: MULTI_LABEL.log_loss(z, y, np.exp(log_t)),
            bounds=(np.log(0.05), np.log(20.0)),
            method="bounded",
        )
        temperatures[k] = float(np.exp(best.x))
    return temperatures


def choose_thresholds(labels: np.ndarray, probabilities: np.ndarray, rule: str) -> np.ndarray:
    """Each finding's decision threshold ``(K,)`` by ``rule``
    (:func:`tasks.evaluation.metrics.choose_threshold`) on its known validation labels."""
    labels = np.asarray(labels, dtype=np.float64)
    thresholds = np.empty(labels.shape[1])
    for k in range(labels.shape[1]):
        known = np.isfinite(labels[:, k])
        thresholds[k] = choose_threshold(
            labels[known, k].astype(np.int64), probabilities[known, k], rule
        )
    return thresholds


def finding_measures(
    labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every finding's AUC, sensitivity and specificity under each row of ``weights``.

    Args:
        labels: ``(N, K)`` 0/1, NaN unknown; probabilities: ``(N, K)``.
        thresholds: ``(K,)`` each finding's decision threshold.
        weights: ``(B, N)`` how often each image counts per row (ones for the plain figures).

    Returns:
        ``{measure: (K, B)}`` for :data:`MEASURES`, plus ``macro_auc`` ``(B,)`` (the mean over
        the findings a row can score) and ``micro_auc`` ``(B,)`` (every known image-finding
        pair pooled into one ranking). NaN where a row cannot define the figure.
    """
    labels = np.asarray(labels, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    decided = MULTI_LABEL.decide(probabilities, thresholds)
    n_findings = labels.shape[1]
    result = {name: np.full((n_findings, len(weights)), np.nan) for name in MEASURES}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in range(n_findings):
            known = np.isfinite(labels[:, k])
            y, w = labels[known, k].astype(np.int64), weights[:, known]
            result["auc"][k] = binary_auc(y, probabilities[known, k], w)
            hit = decided[known, k] == y
            result["sensitivity"][k] = w[:, y == 1] @ hit[y == 1] / w[:, y == 1].sum(axis=1)
            result["specificity"][k] = w[:, y == 0] @ hit[y == 0] / w[:, y == 0].sum(axis=1)
        scored = np.isfinite(result["auc"])
        macro = np.where(scored, result["auc"], 0.0).sum(axis=0) / scored.sum(axis=0)
    known = np.isfinite(labels).ravel()
    pooled_weights = np.repeat(weights, n_findings, axis=1)[:, known]
    micro = binary_auc(
        labels.ravel()[known].astype(np.int64), probabilities.ravel()[known], pooled_weights
    )
    return {**result, "macro_auc": macro, "micro_auc": micro}


def multilabel_report(
    labels: np.ndarray,
    probabilities: np.ndarray,
    thresholds: np.ndarray,
    findings: Sequence[str],
    groups: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The per-finding table of one split, with intervals by bootstrap over patients.

    Args:
        labels, probabilities, thresholds: as :func:`finding_measures`.
        findings: the ``K`` finding names, in column order.
        groups: ``(N,)`` patient of each image; resamples: bootstrap draws (0: no
            intervals); seed: their seed.

    Returns:
        ``{"findings": [{"finding", "threshold", "n_positive", "n_known", "auc", "auc_ci95":
        {"low", "high"}, "sensitivity", ..., "specificity", ...}], "macro_auc", "micro_auc"
        (each with ``_ci95`` when resampled)}``.
    """
    labels = np.asarray(labels, dtype=np.float64)
    ones = np.ones((1, len(labels)))
    point = finding_measures(labels, probabilities, thresholds, ones)
    draws = (
        finding_measures(
            labels, probabilities, thresholds, patient_weights(groups, resamples, seed)
        )
        if resamples > 0
        else None
    )
    rows = []
    for k, name in enumerate(findings):
        known = np.isfinite(labels[:, k])
        row: dict[str, Any] = {
            "finding": str(name),
            "threshold": float(thresholds[k]),
            "n_positive": int((labels[known, k] == 1).sum()),
            "n_known": int(known.sum()),
        }
        for measure in MEASURES:
            row[measure] = float(point[measure][k, 0])
            if draws is not None:
                row[f"{measure}_ci95"] = _interval(draws[measure][k])
        rows.append(row)
    report: dict[str, Any] = {"findings": rows}
    for name in ("macro_auc", "micro_auc"):
        report[name] = float(point[name][0])
        if draws is not None:
            report[f"{name}_ci95"] = _interval(draws[name])
    return report


def _interval(draws: np.ndarray) -> dict[str, float]:
    low, high = percentile_interval(draws)
    return {"low": low, "high": high}
