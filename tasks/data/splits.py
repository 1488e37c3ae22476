"""Patient-level, label-stratified, seeded train/val/test splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def patient_level_split(
    patients: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Assign every image to ``train``, ``val`` or ``test`` so that no patient spans two splits.

    Patients are stratified by their most frequent label; within each stratum they are shuffled
    with ``seed`` and the first ``round(n * test_fraction)`` go to test, the next
    ``round(n * val_fraction)`` to val, the rest to train. A stratum with at least three
    patients puts at least one in each split, so small data sets still have every class
    everywhere. Patient order is taken from first appearance, so the assignment does not
    depend on the (salted) patient keys' values.

    Args:
        patients: one patient key per image.
        labels: one class index per image.
        val_fraction, test_fraction: shares of patients per stratum.
        seed: shuffling seed.

    Returns:
        ``(n_images,)`` array of split names.
    """
    if len(patients) != len(labels):
        raise ValueError("patients and labels must have one entry per image")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")

    per_patient: dict[str, Counter] = {}
    for patient, label in zip(patients, labels, strict=True):
        per_patient.setdefault(patient, Counter())[int(label)] += 1
    strata: dict[int, list[str]] = {}
    for patient, counts in per_patient.items():  # dicts keep first-appearance order
        majority = min(counts, key=lambda lab, c=counts: (-c[lab], lab))
        strata.setdefault(majority, []).append(patient)

    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(strata):
        members = [strata[label][i] for i in rng.permutation(len(strata[label]))]
        n = len(members)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = min(n_test, n)
        n_val = min(n_val, n - n_test)
        for i, patient in enumerate(members):
            assignment[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return np.array([assignment[p] for p in patients], dtype=object).astype(str)
