"""Inherited robustness per transfer strategy on the synthetic default: a measurement, not a test.

In a work folder holding a copy of the project's params.yaml, runs the product's own commands:

1. ``medtransfer ingest``;
2. ``medtransfer train -S train.compare=[...]`` (every strategy, one nested MLflow run each);
3. ``medtransfer robustness`` on each saved strategy (``-S train.model_dir=…/strategies/<s>``)
   over the whole test split, and once more with the frozen-teacher probe as the reference.

Steps whose report is already in the work folder are not run again, so an interrupted run
resumes. Writes ``benchmarks/results/robustness-strategies.md``: per strategy and budget, clean
accuracy, white-box FGSM/PGD accuracy, teacher-transfer (untargeted and mimicry) accuracy and
success, and uniform-noise accuracy.

Usage: ``python -m benchmarks.strategies [--workdir /tmp/medtransfer-strategies]
[--strategies linear_probe partial full scratch]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
COLUMNS = (
    ("robust_acc_fgsm", "FGSM acc"),
    ("robust_acc_pgd", "PGD acc"),
    ("robust_acc_apgd", "white-box acc (APGD-CE, worst case)"),
    ("teacher_transfer_success", "teacher-transfer success"),
    ("teacher_mimicry_success", "mimicry success"),
    ("universal_fooling", "universal fooling (natural images)"),
    ("noise_acc", "noise acc"),
)


def medtransfer(workdir: Path, *args: str) -> float:
    """Run one ``medtransfer`` command in ``workdir``; returns its seconds."""
    command = [str(Path(sys.executable).parent / "medtransfer"), *args, "-q"]
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def run_steps(workdir: Path, strategies: list[str]) -> dict[str, float]:
    """Every step whose report is missing; returns the seconds of those that ran."""
    seconds: dict[str, float] = {}
    reports = workdir / "reports"
    if not (reports / "ingest.json").is_file():
        seconds["ingest"] = medtransfer(workdir, "ingest")
    if not (reports / "train.json").is_file():
        seconds["train"] = medtransfer(
            workdir,
            "train",
            "-S",
            f"train.compare=[{','.join(strategies)}]",
            # the measured setting: a fixed teacher (auto, the default, is refused with compare)
            "-S",
            "train.teacher=efficientnet-lite0",
            "-S",
            f"train.strategy={strategies[0]}",
        )
    for strategy in strategies:
        if not (reports / strategy / "metrics.json").is_file():
            seconds[f"evaluate {strategy}"] = medtransfer(
                workdir,
                "evaluate",
                "-S",
                f"train.model_dir=models/student/strategies/{strategy}",
                "-S",
                f"reports_dir=reports/{strategy}",
            )
    for index, strategy in enumerate(strategies):
        if (reports / strategy / "robustness.json").is_file():
            continue
        seconds[f"robustness {strategy}"] = medtransfer(
            workdir,
            "robustness",
            "-S",
            f"train.model_dir=models/student/strategies/{strategy}",
            "-S",
            f"reports_dir=reports/{strategy}",
            "-S",
            "robustness.max_samples=null",
            "-S",  # the frozen-teacher probe does not depend on the student: attack it once
            f"robustness.reference_probe={'true' if index == 0 else 'false'}",
        )
    return seconds


def _with_interval(value: float | None, bounds: list | None) -> str:
    if value is None or value != value:
        return "n/a"
    if not bounds:
        return f"{value:.2f}"
    return f"{value:.2f} [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def budget_table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown: one line per (model, budget) with every measure and its 95% interval."""
    from tasks.robustness.result import metric_key

    lines = [
        "| model | test AUC | budget /255 | clean acc | "
        + " | ".join(title for _, title in COLUMNS)
        + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(COLUMNS),
    ]
    for name, shown_auc, measured in rows:
        intervals = measured.get("intervals") or {}
        for entry in measured["table"]:
            if entry["eps"] == 0:
                continue
            values = " | ".join(
                _with_interval(entry.get(key), intervals.get(metric_key(key, entry["eps"])))
                for key, _ in COLUMNS
            )
            clean = _with_interval(entry["clean_acc"], intervals.get("clean_acc"))
            lines.append(f"| {name} | {shown_auc} | {entry['eps_255']:g} | {clean} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-strategies"))
    parser.add_argument(
        "--strategies", nargs="+", default=["linear_probe", "partial", "full", "scratch"]
    )
    parser.add_argument("--source", help="data.source (default: the synthetic set)")
    parser.add_argument("--name", default="robustness-strategies", help="result file name")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "params.yaml").is_file():
        shutil.copy(REPO / "params.yaml", args.workdir)
        if args.source:
            _set_source(args.workdir / "params.yaml", args.source)

    seconds = run_steps(args.workdir, args.strategies)
    trained = json.loads((args.workdir / "reports/train.json").read_text())
    test_auc = {run["strategy"]: run["test_auc"] for run in trained["runs"]}
    rows, reference, n_examples = [], None, 0
    for strategy in args.strategies:
        folder = args.workdir / "reports" / strategy
        report = json.loads((folder / "robustness.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())["test"]
        auc_ci = metrics.get("ci95", {}).get("auc", {})
        shown_auc = _with_interval(metrics["auc"], [auc_ci.get("low"), auc_ci.get("high")])
        n_examples = report["n_examples"]
        rows.append((strategy, shown_auc or f"{test_auc[strategy]:.3f}", report))
        if report["reference_probe"]:
            reference = report["reference_probe"]
    if reference:
        rows.append(("frozen-teacher probe", "n/a", reference))
    table = budget_table(rows)
    config = report["config"]
    timing = ", ".join(f"{step} {s:.0f} s" for step, s in seconds.items()) or "reused reports"
    print(table)
    write_result(
        args.name,
        f"{machine_header()}\n\n{args.source or 'Synthetic default'} (params.yaml), every strategy of "
        f"`train.compare=[{','.join(args.strategies)}]` attacked on the whole test split "
        f"({n_examples} images), {config['pgd_steps']} PGD steps; the teacher-transfer "
        "perturbations are crafted on the frozen ImageNet teacher alone. Success = share of "
        f"the model's correct answers that the attack flips. Steps timed: {timing}.\n\n{table}",
    )


def _set_source(params_file: Path, source: str) -> None:
    """Point the work folder's params.yaml at another data source (a MedMNIST .npz)."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    params["data"]["source"] = source
    params["data"]["labels_csv"] = None
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    main()
