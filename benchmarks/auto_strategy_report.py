"""The results file of :mod:`benchmarks.auto_strategy`: its JSON lines as markdown tables.

Reads ``<workdir>/<data>/runs.jsonl`` (one finished run a line) and writes
``benchmarks/results/auto-strategy-exhaustive.md``: per data set every run's test AUC with its
95% interval and every gate's figure with its interval, auto's choice against the best
exhaustive run that passes the gates, the times, and which runs of the grid are missing.
``--notes PATH`` appends a hand-written section (the decision) after the tables.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.report import RESULTS_DIR, machine_header, write_result

NAME = "auto-strategy-exhaustive"
TARGET_AUC_GAP = 0.01
TARGET_TIME_SHARE = 0.40
SETTINGS = (
    "Every run through the product's own stages (run_train, run_evaluate, run_robustness; "
    "shipped params.yaml otherwise), two processes taking the grid's runs as they came free "
    "(`--claim`, one from each end) under `nice -n 5` with one torch/OpenMP thread each "
    "(OMP_NUM_THREADS=1) on the 2-core machine, otherwise quiet (load average 2 to 3); times "
    "are each process's CPU seconds (wall in brackets). The same image size and epochs for auto "
    "(its pilots and its final student) and every exhaustive run within a data set; auto's "
    "pilots within the shipped train.auto_budget_minutes. Robustness: the gates' budgets only "
    "(1/255 and 2/255), no reference probe, no Square attack (its gate is off): the gates' "
    "figures are those of the full sweep. Test AUC: 95% patient bootstrap (1000 resamples); "
    "gate figures: estimate [95% interval] (n), a gate passes on its interval's bound."
)
GATES = ("clean_auc", "worst_group_auc", "teacher_transfer_success", "universal_fooling")


def load(workdir: Path) -> dict[str, list[dict]]:
    """Each data set's rows, in the order they finished."""
    found = {}
    for jsonl in sorted(workdir.glob("*/runs.jsonl")):
        rows: dict[str, dict] = {}
        for line in jsonl.read_text().splitlines():
            if line:  # a run two processes finished: the first record counts
                rows.setdefault(json.loads(line)["label"], json.loads(line))
        if rows:
            found[jsonl.parent.name] = list(rows.values())
    return found


def _auc(row: dict) -> str:
    low, high = row["test_auc_ci95"]
    return f"{row['test_auc']:.3f} [{low:.3f}, {high:.3f}]"


def _gate(row: dict, name: str) -> str:
    gate = next((g for g in row["verdict"]["gates"] if g["name"] == name), None)
    if gate is None:
        return "-"
    mark = "" if gate["passed"] else " **FAIL**"
    return f"{gate['estimate']:.2f} [{gate['ci_low']:.2f}, {gate['ci_up']:.2f}] ({gate['n']}){mark}"


def _seconds(row: dict, key: str = "cpu_seconds") -> float:
    return sum(row[key].values())


def run_rows(rows: list[dict]) -> list[str]:
    """Every run of one data set as a table row, auto first."""
    lines = [
        "| run | test AUC [95% CI] | clean AUC gate (lower >= 0.8) | worst group (lower >= 0.5) "
        "| teacher-transfer success at 1/255 (upper <= 0.6) | universal fooling at 2/255 "
        "(upper <= 0.5) | gates | epochs (best) | train CPU s | total CPU s (wall s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in sorted(rows, key=lambda r: r["label"] != "auto"):
        label = row["label"]
        if label == "auto":
            chosen = f"{row['teacher'].removeprefix('efficientnet-')} {row['strategy']}"
            if row["strategy"] == "partial":
                chosen += f"/{row['unfreeze_blocks']}"
            label = f"**auto** (chose {chosen})"
        lines.append(
            f"| {label} | {_auc(row)} | "
            + " | ".join(_gate(row, name) for name in GATES)
            + f" | {'pass' if row['verdict']['passed'] else 'FAIL'} | {row['epochs_run']} "
            f"({row['best_epoch']}) | {row['cpu_seconds']['train']:.0f} | "
            f"{_seconds(row):.0f} ({_seconds(row, 'seconds'):.0f}) |"
        )
    return lines


def summary(name: str, rows: list[dict], grid: list[str]) -> tuple[str, list[str]]:
    """One summary-table row for a data set, and the sentences below its table."""
    auto = next((r for r in rows if r["label"] == "auto"), None)
    exhaustive = [r for r in rows if r["label"] != "auto"]
    missing = [label for label in grid if label not in {r["label"] for r in exhaustive}]
    notes = []
    if missing:
        notes.append(
            f"**Incomplete**: {len(missing)} of {len(grid)} exhaustive runs not run (time): "
            + ", ".join(missing)
            + ". The 'best exhaustive' is the best of those run, not of the whole grid, and the "
            "exhaustive time is estimated (the mean run of those done, times 21)."
        )
    if auto is None or not exhaustive:
        return f"| {name} | not run | | | | | | | |", notes
    passing = [r for r in exhaustive if r["verdict"]["passed"]]
    best = max(passing or exhaustive, key=lambda r: r["test_auc"])
    gap = auto["test_auc"] - best["test_auc"]
    # an incomplete grid's total is estimated: the mean run of those done, times the grid
    scale = len(grid) / len(exhaustive)
    exhaustive_cpu = sum(_seconds(r) for r in exhaustive) * scale
    exhaustive_wall = sum(_seconds(r, "seconds") for r in exhaustive) * scale
    cpu_share = _seconds(auto) / exhaustive_cpu
    wall_share = _seconds(auto, "seconds") / exhaustive_wall
    met_auc = auto["verdict"]["passed"] and gap >= -TARGET_AUC_GAP
    verdict = (
        ("met" if met_auc else "missed")
        if not missing
        else ("missed so far" if not met_auc else "met so far")
    )
    estimated = " (est.)" if missing else ""
    row = (
        f"| {name} | {_choice(auto)} | {_auc(auto)} | "
        f"{'pass' if auto['verdict']['passed'] else 'FAIL'} | {best['label']}: {_auc(best)}"
        f"{'' if passing else ' (none passes)'} | {gap:+.3f} ({verdict}) | "
        f"{_seconds(auto):.0f} / {exhaustive_cpu:.0f}{estimated} CPU s = {cpu_share:.0%} | "
        f"{_seconds(auto, 'seconds'):.0f} / {exhaustive_wall:.0f}{estimated} s = {wall_share:.0%}"
        f" | {len(exhaustive)}/{len(grid)} |"
    )
    choice = auto.get("auto") or {}
    pilots = choice.get("pilots") or {}
    evidence_s = choice.get("seconds", 0.0) - pilots.get("seconds", 0.0)
    notes.append(
        f"auto's train stage: evidence {evidence_s:.0f} s, pilots {pilots.get('seconds', 0.0):.0f} s "
        f"(wall; budget spent: {pilots.get('budget_spent')}), then the chosen student; train "
        f"stage {auto['seconds']['train']:.0f} s wall, {auto['cpu_seconds']['train']:.0f} s CPU."
    )
    notes.append("Why auto chose it (the rule's words): " + "; ".join(choice.get("reasons", [])))
    notes += choice.get("decision_table") or []
    return row, notes


def _choice(auto: dict) -> str:
    choice = auto.get("auto") or {}
    label = f"{auto['teacher'].removeprefix('efficientnet-')} {auto['strategy']}"
    if auto["strategy"] == "partial":
        label += f"/{auto['unfreeze_blocks']}"
    return f"{label} ({choice.get('confidence', '?')}; runner-up {choice.get('runner_up')})"


def copy_plot(workdir: Path, name: str) -> str | None:
    """The accuracy-against-exposure plot that auto's train stage logged to MLflow
    (``auto/accuracy_vs_exposure.png``), copied into the results; its file name or None."""
    found = sorted((workdir / name).glob("mlartifacts*/**/auto/accuracy_vs_exposure.png"))
    if not found:
        return None
    target = f"{NAME}-{name}-accuracy-vs-exposure.png"
    shutil.copyfile(found[-1], RESULTS_DIR / target)
    return target


def render(workdir: Path, notes: Path | None = None) -> Path:
    """Write the results file from ``workdir``'s JSON lines; returns its path."""
    from benchmarks.auto_strategy import key_label, run_keys

    grid = [key_label(*key) for key in run_keys() if key[0] != "auto"]
    measured = load(workdir)
    lines = [
        "| data | auto chose (confidence; runner-up) | auto test AUC [95% CI] | auto gates | "
        "best exhaustive that passes | auto - best (target >= -0.01, auto passing) | auto / "
        "exhaustive CPU (target <= 40%) | auto / exhaustive wall | exhaustive runs |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    sections = []
    for name, rows in measured.items():
        row, sentences = summary(name, rows, grid)
        lines.append(row)
        first = rows[0]
        plot = copy_plot(workdir, name)
        sections += [
            f"\n## {name}: {first['image_size']} px, {first['epochs']} epochs, "
            f"{first['n_test']} test images\n",
            *run_rows(rows),
            "",
            *sentences,
        ]
        if plot:
            sections.append(f"\nauto's accuracy against exposure (its finalists): `{plot}`")
    text = "\n".join([machine_header(), "", SETTINGS, "", *lines, *sections])
    if notes is not None:
        text += "\n\n" + notes.read_text()
    return write_result(NAME, text)
