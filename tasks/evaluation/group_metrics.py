"""Test figures by group (scanner, view, body part, site): where the model is weak.

For each attribute ``eval.groups`` lists (:mod:`tasks.data.groups`), the test images are split
by its value; a group of fewer than ``eval.min_group_size`` test patients is pooled into
``other`` (the pooled groups are counted), whose figures are given only when the pool itself
reaches the size. Each group reported gets AUC, sensitivity, specificity and ECE at the
validation threshold with 95% patient-bootstrap intervals, and the conformal sets' coverage
with its Wilson interval when sets are given. :func:`worst_group` picks the group the
``gates.min_worst_group_auc`` gate judges: the lowest AUC lower bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tasks.evaluation.conformal import measure
from tasks.evaluation.metrics import bootstrap_intervals, split_metrics

if TYPE_CHECKING:
    from tasks.config import EvalParams
    from tasks.data.dataset import ProcessedDataset
    from tasks.evaluation.evaluation import Evaluation

OTHER = "other"
GROUP_METRICS = ("auc", "sensitivity", "specificity", "ece")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def pooled(values: np.ndarray, patients: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """``values`` ``(N,)`` with every group of fewer than ``min_size`` distinct ``patients``
    replaced by :data:`OTHER`, and how many groups were pooled."""
    values = np.asarray(values, dtype=object)
    small = [
        value for value in np.unique(values) if len(np.unique(patients[values == value])) < min_size
    ]
    out = values.copy()
    out[np.isin(values, small)] = OTHER
    return out, len(small)


def group_rows(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    patients: np.ndarray,
    attributes: Mapping[str, np.ndarray],
    min_size: int,
    resamples: int,
    seed: int,
    sets: np.ndarray | None = None,
) -> list[dict]:
    """One row per (attribute, group) of the test split.

    Args:
        labels ``(N,)``, probabilities ``(N, C)``, patients ``(N,)``: the test split.
        attributes: ``{attribute: values (N,)}``.
        min_size: the fewest patients a group needs for its own row.
        resamples, seed: the patient bootstrap behind every interval.
        sets: the conformal prediction sets ``(N, C)`` bool, or None.

    Returns:
        Rows ``{attribute, group, n_patients, n_images, pooled_groups, auc, auc_ci_low,
        auc_ci_high, ...}``; the ``other`` row has figures (else None) only when the pooled
        patients reach ``min_size``.
    """
    rows = []
    for attribute, raw in attributes.items():
        values, n_pooled = pooled(raw, patients, min_size)
        for value in sorted(np.unique(values), key=lambda v: (v == OTHER, v)):
            mask = values == value
            row = {
                "attribute": attribute,
                "group": str(value),
                "n_patients": len(np.unique(patients[mask])),
                "n_images": int(mask.sum()),
                "pooled_groups": n_pooled if value == OTHER else 0,
            }
            if row["n_patients"] >= min_size:
                row.update(
                    _figures(
                        labels[mask],
                        probabilities[mask],
                        threshold,
                        patients[mask],
                        resamples,
                        seed,
                        None if sets is None else sets[mask],
                    )
                )
            else:
                row.update({name: None for name in _figure_names(sets is not None)})
            rows.append(row)
    return rows


def split_group_rows(
    dataset: ProcessedDataset,
    evaluation: Evaluation,
    config: EvalParams,
    seed: int,
    sets: np.ndarray | None = None,
) -> list[dict]:
    """:func:`group_rows` of ``evaluation``'s test split, by the attributes ``eval.groups``
    lists, with ``eval.min_group_size`` and ``eval.bootstrap`` (the evaluate and robustness
    stages' one call, so both judge the same groups)."""
    test = dataset.indices("test")
    return group_rows(
        evaluation.labels["test"],
        evaluation.probabilities["test"],
        evaluation.threshold,
        dataset.manifest["patient_hash"].to_numpy()[test],
        {name: dataset.group_values(name, "test") for name in config.groups},
        config.min_group_size,
        config.bootstrap,
        seed,
        sets,
    )


def _figure_names(with_sets: bool) -> list[str]:
    names = [f"{m}{s}" for m in GROUP_METRICS for s in ("", "_ci_low", "_ci_high")]
    return names + (["coverage", "coverage_ci_low", "coverage_ci_high"] if with_sets else [])


def _figures(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    patients: np.ndarray,
    resamples: int,
    seed: int,
    sets: np.ndarray | None,
) -> dict[str, float]:
    """A group's figures with their intervals (see :func:`group_rows`)."""
    point = split_metrics(labels, probabilities, threshold)
    intervals = bootstrap_intervals(labels, probabilities, threshold, patients, resamples, seed)
    figures: dict[str, float] = {}
    for name in GROUP_METRICS:
        figures[name] = float(getattr(point, name))
        figures[f"{name}_ci_low"], figures[f"{name}_ci_high"] = intervals[name]
    if sets is not None:
        covered = measure(sets, labels)
        figures["coverage"] = covered.rate
        figures["coverage_ci_low"], figures["coverage_ci_high"] = covered.interval
    return figures


def worst_group(rows: Sequence[Mapping]) -> Mapping | None:
    """The row with the lowest finite AUC lower bound (the gate's group); None when no group
    has one (every group too small, or of one class: AUC undefined)."""
    judged = [r for r in rows if _finite(r.get("auc_ci_low"))]
    return min(judged, key=lambda r: (r["auc_ci_low"], r["attribute"], r["group"]), default=None)


def worst_summary(rows: Sequence[Mapping]) -> dict[str, float | int | None]:
    """The few numbers ``metrics.json`` carries (a small DVC metric, the table is a plot):
    the worst group's AUC and lower bound, and how many groups were judged."""
    worst = worst_group(rows)
    return {
        "worst_group_auc": None if worst is None else worst["auc"],
        "worst_group_auc_ci_low": None if worst is None else worst["auc_ci_low"],
        "groups_judged": sum(_finite(r.get("auc_ci_low")) for r in rows),
    }


def mlflow_metrics(rows: Sequence[Mapping]) -> dict[str, float]:
    """Flat MLflow metrics ``group.<attribute>.<group>.<figure>`` of every judged row (group
    names reduced to MLflow's allowed characters)."""
    flat = {}
    for row in rows:
        prefix = f"group.{row['attribute']}.{_UNSAFE.sub('_', row['group'])[:60]}"
        flat[f"{prefix}.n_patients"] = float(row["n_patients"])
        for name, value in row.items():
            if name not in ("attribute", "group", "n_patients") and _finite(value):
                flat[f"{prefix}.{name}"] = float(value)
    return flat


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
