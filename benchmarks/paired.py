"""Two or more students scored on the same test patients: each test AUC with its patient-level
95% bootstrap interval, and the paired difference of two of them on the same resamples."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def paired_test_auc(
    processed_dir: str | Path,
    students: dict[str, Path],
    first: str,
    second: str,
    seed: int,
    resamples: int = 1000,
) -> dict:
    """Score each saved student (``name -> model folder``) on the test split of
    ``processed_dir``.

    Returns:
        ``{name: {"test_auc", "low", "high"}}`` for every student, ``"against"``: for
        every other student ``{name: {"estimate", "low", "high"}}`` of ``name - second``,
        both AUCs taken on the same resampled patients each time (1,000 patient-bootstrap
        resamples by default), and ``"difference"``: that of ``first`` (``None`` when
        ``first`` is ``second``, a run of one student).
    """
    from tasks.data.dataset import load_processed
    from tasks.evaluation.evaluation import evaluate_student
    from tasks.evaluation.metrics import patient_weights, weighted_metrics
    from tasks.model.student_io import load_student

    dataset = load_processed(processed_dir)
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    weights = patient_weights(patients, resamples, seed)
    out, draws = {}, {}
    for name, folder in students.items():
        model, _ = load_student(folder)
        evaluation = evaluate_student(model, dataset, "youden")
        labels, probs = evaluation.labels["test"], evaluation.probabilities["test"]
        draws[name] = weighted_metrics(labels, probs, 0.5, weights)["auc"]
        low, high = np.nanpercentile(draws[name], [2.5, 97.5])
        out[name] = {"test_auc": evaluation.test.auc, "low": float(low), "high": float(high)}
    out["against"] = {
        name: _difference(out, draws, name, second) for name in students if name != second
    }
    out["difference"] = out["against"].get(first)
    return out


def _difference(out: dict, draws: dict, name: str, baseline: str) -> dict:
    """``name - baseline``: the test AUC difference and its paired 95% interval."""
    low, high = np.nanpercentile(draws[name] - draws[baseline], [2.5, 97.5])
    estimate = out[name]["test_auc"] - out[baseline]["test_auc"]
    return {"estimate": estimate, "low": float(low), "high": float(high)}
