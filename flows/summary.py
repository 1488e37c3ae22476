"""The short human summary of a run or a stage: what a person needs to act on, in a few lines.

``medtransfer run`` prints it at the end (the full JSON behind ``--json``), each stage command
prints its own part, and the flow shows the same lines as a Prefect markdown artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tasks.digest import shown_version


def summary_lines(summary: dict[str, Any], tracking_uri: str | None = None) -> list[str]:
    """The summary of whichever stages ``summary`` holds (keys: stage names, plus ``cached``).

    Args:
        summary: ``{"ingest": <ingest report>, "train": <train report>, ...}``; any subset.
        tracking_uri: the MLflow store, named in the line that says how to open the UI.

    Returns:
        Lines of plain text, one fact each.
    """
    lines: list[str] = []
    for stage, describe in SECTIONS.items():
        if summary.get(stage):
            lines += describe(summary[stage])
    if "train" in summary and summary["train"].get("run_id"):
        lines.append(_mlflow_line(summary["train"]["run_id"], tracking_uri))
    if summary.get("cached"):
        lines.append(f"cache hits (not recomputed): {', '.join(summary['cached'])}")
    return lines


def _ingest(report: dict) -> list[str]:
    reasons = {k: v for k, v in report.get("quarantined_by_reason", {}).items() if v}
    splits = ", ".join(f"{s} {v['images']}" for s, v in report.get("splits", {}).items())
    return [
        f"data: {report['files_seen']} files seen ({report['source_kind']}), "
        f"{report['ingested']} ingested, {report['quarantined']} quarantined"
        + (f" {reasons}" if reasons else ""),
        f"images per split: {splits}",
    ]


def _train(report: dict) -> list[str]:
    return [
        f"dataset version: {shown_version(report.get('dataset_version', '?'))}",
        *_auto_decision(report.get("auto")),
        # Epochs count from 1 everywhere: the training log, the report, MLflow's best_epoch.
        f"student: {report.get('strategy')}, best epoch {report.get('best_epoch')} "
        f"of {report.get('epochs_run')}, validation AUC {_number(report.get('best_val_auc'))}",
    ]


def _auto_decision(auto: dict | None) -> list[str]:
    """What ``auto`` chose, its confidence and runner-up, and its first reason (nothing when
    the teacher and strategy were set by hand)."""
    if not auto:
        return []
    depth = f" {auto.get('unfreeze_blocks')} blocks" if auto.get("strategy") == "partial" else ""
    return [
        f"auto chose {auto.get('teacher')} {auto.get('strategy')}{depth} (confidence "
        f"{auto.get('confidence')}; runner-up {auto.get('runner_up') or 'none'})",
        *(f"  because {reason}" for reason in (auto.get("reasons") or [])[:1]),
    ]


def _evaluate(report: dict) -> list[str]:
    test = report.get("test") or {}
    ci = test.get("ci95") or {}

    def value(name: str) -> str:
        bounds = ci.get(name) or {}
        interval = (
            f" [{_number(bounds.get('low'))}, {_number(bounds.get('high'))}]" if bounds else ""
        )
        return f"{_number(test.get(name))}{interval}"

    if "findings" in test:  # multi-label: macro and micro AUC, then each finding
        lines = [
            f"test macro AUC {value('auc')}, micro AUC {_number(test.get('micro_auc'))}",
            *(_finding_line(row) for row in test["findings"]),
        ]
    elif "per_class" in test:  # more than two classes: the macro figures, then each class
        lines = [
            f"test AUC (one vs rest, macro) {value('auc')}, balanced accuracy "
            f"{value('balanced_accuracy')} (top class)",
            *(_class_line(row) for row in test["per_class"]),
        ]
    else:
        lines = [
            f"test AUC {value('auc')}, sensitivity {value('sensitivity')}, "
            f"specificity {value('specificity')} at threshold "
            f"{_number(report.get('threshold'))} ({report.get('threshold_rule')})"
        ]
    if ci:
        lines.append(
            f"  95% intervals: bootstrap over {test.get('n_patients')} test patients "
            f"({test.get('n_images')} images)"
        )
    return lines


def _finding_line(row: dict) -> str:
    """One finding of a multi-label report: AUC, sensitivity and specificity at its
    threshold, with intervals."""

    def value(name: str) -> str:
        bounds = row.get(f"{name}_ci95") or {}
        interval = (
            f" [{_number(bounds.get('low'))}, {_number(bounds.get('high'))}]" if bounds else ""
        )
        return f"{_number(row.get(name))}{interval}"

    return (
        f"  {row.get('finding')} ({row.get('n_positive')} of {row.get('n_known')}): AUC "
        f"{value('auc')}, sensitivity {value('sensitivity')}, specificity "
        f"{value('specificity')} at {_number(row.get('threshold'))}"
    )


def _class_line(row: dict) -> str:
    """One class of the per-class table: its AUC, sensitivity and precision with intervals."""

    def number(value: Any) -> str:
        return "n/a" if value is None else _number(value)  # None: the class was never chosen

    def value(name: str) -> str:
        bounds = row.get(f"{name}_ci95") or {}
        interval = f" [{number(bounds.get('low'))}, {number(bounds.get('high'))}]" if bounds else ""
        return f"{number(row.get(name))}{interval}"

    return (
        f"  {row.get('class')} (n={row.get('n')}): AUC {value('auc')}, sensitivity "
        f"{value('sensitivity')}, precision {value('precision')}"
    )


def _robustness(report: dict) -> list[str]:
    verdict = report.get("verdict") or {}
    lines = [
        f"robustness verdict: {'PASS' if verdict.get('passed') else 'FAIL'} "
        f"({report.get('n_examples')} attacked test images)"
    ]
    return lines + [f"  {reason}" for reason in verdict.get("reasons", [])]


def _register(report: dict) -> list[str]:
    where = (
        f"alias '{report['alias']}' moved to it"
        if report.get("alias_moved")
        else f"alias '{report['alias']}' stays on version {report.get('champion_version')}"
    )
    lines = [f"registry: {report['model_name']} version {report['version']}; {where}"]
    return lines + [f"  {reason}" for reason in report.get("reasons", [])]


def _package(report: dict) -> list[str]:
    if report.get("built") is False:
        lines = [f"Bento: none built, {report.get('reason')}"]
        stopped_by = report.get("stopped_by") or []
        if stopped_by:
            lines.append(f"  stopped by: {stopped_by[0]}")
        what = (
            f"to build version {report['latest_version']} anyway (no approval implied)"
            if report.get("latest_version")
            else "to register a version first"
        )
        return [*lines, f"next: {what}: {report.get('next')}"]
    lines = [f"Bento: {report['bento']}, archive {report['archive']}"]
    if report.get("approved") is False:
        lines.append(f"  {report.get('approval')}")
    return lines


SECTIONS = {
    "ingest": _ingest,
    "train": _train,
    "evaluate": _evaluate,
    "robustness": _robustness,
    "register": _register,
    "package": _package,
}


def _mlflow_line(run_id: str, tracking_uri: str | None) -> str:
    store = tracking_uri or "sqlite:///mlflow.db"
    return (
        f"MLflow run {run_id}: open the UI with `{mlflow_command()} ui --backend-store-uri "
        f"{store}`, then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning "
        "(the training view)"
    )


def mlflow_command() -> str:
    """The ``mlflow`` script of the environment medtransfer runs in (``.venv/bin/mlflow`` from
    the checkout): a bare ``mlflow`` is not on PATH outside the activated venv."""
    script = Path(sys.executable).parent / "mlflow"
    if not script.is_file():
        return "mlflow"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else str(value)
