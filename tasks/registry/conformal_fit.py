"""Calibrating the served prediction sets at packaging, and measuring them on the test split.

The packaged student (its registry weights and temperature) predicts the validation split,
whose APS scores give the set rule at ``serving.coverage`` (:mod:`tasks.evaluation.conformal`);
the test split then measures its coverage (with a 95% Wilson interval) and mean set size.
Abstention is measured beside it, not mixed in: the share of test images the OOD gate refuses,
and the coverage on the images it accepts (what a caller is actually given a set for).
"""

from __future__ import annotations

import numpy as np

from tasks.config import Params
from tasks.data.dataset import load_processed
from tasks.evaluation.conformal import (
    ConformalCalibration,
    calibrate,
    conformal_report,
    measure,
    report_metrics,
    split_uniforms,
)
from tasks.evaluation.metrics import wilson_interval
from tasks.registry.profile_fit import forward


def fit_conformal(model, spec, params: Params, detector=None) -> tuple[ConformalCalibration, dict]:
    """The set rule calibrated on ``data.processed_dir``'s validation split, and the package
    report's ``conformal`` block (the rule, the test coverage; with ``detector``, an
    :class:`tasks.model.profile.OodDetector` with its threshold set, the test abstention and
    the coverage on the accepted images)."""
    dataset = load_processed(params.data.processed_dir)
    val_images, val_labels = dataset.subset("val")
    test_images, test_labels = dataset.subset("test")
    val_probs, _ = forward(model, val_images, spec.temperature)
    test_probs, test_features = forward(model, test_images, spec.temperature)
    draws = split_uniforms(dataset)
    rule = calibrate(val_probs, val_labels, params.serving.coverage, draws["val"])
    sets = rule.sets(test_probs, draws["test"])
    block = conformal_report(rule, measure(sets, test_labels))
    if detector is not None and params.serving.ood_gate and len(test_labels):
        abstained = detector.score(test_features) >= detector.threshold
        low, high = wilson_interval(int(abstained.sum()), len(abstained))
        block["test_abstention"] = {
            "abstained": int(abstained.sum()),
            "n": len(abstained),
            "rate": float(abstained.mean()),
            "ci95": {"low": low, "high": high},
        }
        accepted = ~abstained
        block["test_accepted"] = measure(sets[accepted], test_labels[accepted]).to_dict()
    return rule, block


def mlflow_metrics(block: dict) -> dict[str, float]:
    """The block's figures as flat ``package_conformal_*`` MLflow metrics (finite ones)."""
    flat = report_metrics(block, "package_conformal_")
    if "test_abstention" in block:
        flat["package_test_abstention_rate"] = block["test_abstention"]["rate"]
        flat["package_conformal_accepted_coverage"] = block["test_accepted"]["coverage"]
    return {k: float(v) for k, v in flat.items() if v is not None and np.isfinite(v)}
