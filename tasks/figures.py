"""The figures that decide, as DVC metrics: one small JSON file per figure, numbers only.

The stage reports (``reports/*.json``) hold everything a stage found, strings and tables
included; dvc.yaml declares them plain outputs. What ``dvc metrics show`` (and ``dvc metrics
diff``, ``dvc exp show``) prints is a folder per deciding stage, one file per figure, so the
table has a row per figure and a handful of columns (DVC sorts them by name)::

    Path                                          bound  ci_low  ci_up  estimate  limit  n   passed
    reports/figures/evaluate/test_auc.json        -      0.333   0.875  0.571     -      4   -
    reports/figures/robustness/clean_auc.json     0.333  0.333   0.875  0.571     0.8    13  0
    reports/figures/robustness/verdict.json       -      -       -      -         -      -   0

Columns: ``estimate`` and its 95% interval ``ci_low``/``ci_up`` over ``n`` (test patients for
the bootstrap of the evaluation, attacked images for a gate); a gate's decisive ``bound`` (the
lower bound for a minimum, the upper for a maximum) beside its ``limit``, and ``passed`` (1 or
0, also the verdict's). To add a figure, add an entry to the mapping
:func:`evaluation_figures` or :func:`verdict_figures` returns (a new file, a new row); a new
column only when no existing one fits, since every column widens the whole table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks import atomic
from tasks.reports import as_json

FIGURES_DIR = "figures"
# The evaluation's figures: the test split's metrics, each with its bootstrap interval.
TEST_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ece")

Figure = dict[str, float | int | None]


def figures_dir(reports_dir: str | Path, stage: str) -> Path:
    """``<reports_dir>/figures/<stage>``: the folder dvc.yaml declares as ``stage``'s metrics."""
    return Path(reports_dir) / FIGURES_DIR / stage


def evaluation_figures(report: Mapping[str, Any]) -> dict[str, Figure]:
    """The metrics report's test figures: ``{"test_auc": {"estimate", "ci_low", "ci_up",
    "n"}, ...}`` for each of :data:`TEST_METRICS` (``n``: test patients, the bootstrap's
    unit)."""
    test = report.get("test") or {}
    intervals = test.get("ci95") or {}
    figures: dict[str, Figure] = {}
    for name in TEST_METRICS:
        interval = intervals.get(name) or {}
        figures[f"test_{name}"] = {
            "estimate": test.get(name),
            "ci_low": interval.get("low"),
            "ci_up": interval.get("high"),
            "n": test.get("n_patients"),
        }
    return figures


def verdict_figures(verdict: Mapping[str, Any]) -> dict[str, Figure]:
    """The robustness verdict's figures: ``verdict`` (``passed`` 1 or 0) and one
    ``<name>`` per configured gate (its ``gates`` entries, see
    :class:`tasks.robustness.gates.Verdict`; no prefix: the folder says they are the
    robustness gates, and the path column sets the table's width)."""
    figures: dict[str, Figure] = {"verdict": {"passed": int(bool(verdict.get("passed")))}}
    for gate in verdict.get("gates") or []:
        figures[gate["name"]] = {
            key: (int(gate[key]) if key == "passed" else gate.get(key))
            for key in ("bound", "limit", "estimate", "ci_low", "ci_up", "n", "passed")
        }
    return figures


def write_figures(reports_dir: str | Path, stage: str, figures: Mapping[str, Figure]) -> Path:
    """Replace ``stage``'s figures folder with one ``<name>.json`` per figure, swapped in whole
    (:mod:`tasks.atomic`), so no figure of an earlier run is left beside the new ones; returns
    the folder."""
    target = figures_dir(reports_dir, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.recover_folder(target)
    staging = atomic.new_staging_folder(target)
    try:
        for name, figure in figures.items():
            (staging / f"{name}.json").write_text(json.dumps(as_json(figure), indent=1) + "\n")
        atomic.swap_in_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
