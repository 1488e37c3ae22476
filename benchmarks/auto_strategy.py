"""``train.strategy: auto`` + ``train.teacher: auto`` against the exhaustive search: a measurement.

For each data set, in its own work folder holding a copy of params.yaml, runs the product's own
commands side by side:

1. ``medtransfer ingest`` (``data.image_size`` and ``train.epochs`` as given: small on a CPU);
2. ``medtransfer train -S train.teacher=auto -S train.strategy=auto`` (evidence step included
   in its time);
3. the exhaustive search: ``medtransfer train -S train.teacher=T -S train.compare=[...]`` for
   every bundled teacher T over every transfer strategy (the scratch control is not a
   candidate of ``auto`` and is left out of both).

Writes ``benchmarks/results/auto-strategy.md``: auto's choice, its test AUC with a 95% interval
(Hanley-McNeil), the best exhaustive test AUC, and both wall times. Steps whose report exists
are not run again.

Usage: ``python -m benchmarks.auto_strategy [--workdir /tmp/mt-auto] [--size 64] [--epochs 6]
[--data synthetic /path/to/breastmnist.npz]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
TEACHERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
STRATEGIES = ("linear_probe", "partial", "full", "lp_ft")


def medtransfer(workdir: Path, *args: str) -> float:
    """Run one ``medtransfer`` command in ``workdir``; returns its seconds."""
    command = [sys.executable, "-m", "flows.cli", *args, "-q"]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)  # the work folder's own MLflow store (params.yaml)
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def hanley_mcneil(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """95% interval of an AUC from its standard error (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    half = 1.96 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def run_dataset(
    workdir: Path, source: str, size: int, epochs: int, patients: int, teachers: list[str]
) -> dict:
    """Ingest, auto and the exhaustive search for one data set; returns the measured values."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "params.yaml").is_file():
        shutil.copy(REPO / "params.yaml", workdir)
    common = ["-S", f"data.image_size={size}", "-S", f"train.epochs={epochs}"]
    if source == "synthetic":
        if not (workdir / "data/synthetic/dicom").is_dir():
            medtransfer(workdir, "synthesize", "-S", f"synthetic.n_patients={patients}")
    else:
        common += ["-S", f"data.source={source}"]
    if not (workdir / "reports/ingest.json").is_file():
        medtransfer(workdir, "ingest", *common)
    seconds = {}

    def train(name: str, *extra: str) -> dict:
        report = workdir / "reports" / name / "train.json"
        if not report.is_file():
            seconds[name] = medtransfer(
                workdir,
                "train",
                *common,
                "-S",
                f"reports_dir=reports/{name}",
                "-S",
                f"train.model_dir=models/{name}",
                *extra,
            )
            (workdir / "reports" / name / "seconds.json").write_text(json.dumps(seconds[name]))
        seconds[name] = json.loads((workdir / "reports" / name / "seconds.json").read_text())
        return json.loads(report.read_text())

    auto = train("auto", "-S", "train.teacher=auto", "-S", "train.strategy=auto")
    exhaustive = {
        teacher: train(
            f"exhaustive-{teacher}",
            "-S",
            f"train.teacher={teacher}",
            "-S",
            f"train.compare=[{','.join(STRATEGIES)}]",
        )
        for teacher in teachers
    }
    return {"auto": auto, "exhaustive": exhaustive, "seconds": seconds, "workdir": workdir}


def test_counts(workdir: Path) -> tuple[int, int]:
    """Positive and negative images of the processed test split."""
    sys.path.insert(0, str(REPO))
    from tasks.data.dataset import load_processed

    dataset = load_processed(workdir / "data/processed")
    labels = dataset.labels[dataset.indices("test")]
    return int((labels == 1).sum()), int((labels == 0).sum())


def table_rows(name: str, measured: dict) -> list[str]:
    """Markdown rows for one data set."""
    auto, seconds = measured["auto"], measured["seconds"]
    n_pos, n_neg = test_counts(measured["workdir"])
    low, high = hanley_mcneil(auto["test_auc"], n_pos, n_neg)
    runs = [
        (teacher, run["strategy"], run["test_auc"])
        for teacher, report in measured["exhaustive"].items()
        for run in report["runs"]
    ]
    best = max(runs, key=lambda r: r[2])
    exhaustive_s = sum(s for k, s in seconds.items() if k.startswith("exhaustive"))
    choice = auto["auto"]
    best_low, best_high = hanley_mcneil(best[2], n_pos, n_neg)
    every = "; ".join(f"{t.removeprefix('efficientnet-')} {s} {a:.3f}" for t, s, a in runs)
    return [
        f"| {name} | {choice['teacher']} {choice['strategy']} (unfreeze "
        f"{choice['unfreeze_blocks']}, {choice['confidence']}) | {auto['test_auc']:.3f} "
        f"[{low:.3f}, {high:.3f}] | {best[0]} {best[1]}: {best[2]:.3f} [{best_low:.3f}, "
        f"{best_high:.3f}] | {auto['test_auc'] - best[2]:+.3f} | {seconds['auto']:.0f} s "
        f"(evidence {choice['seconds']:.0f} s) | {exhaustive_s:.0f} s | "
        f"{seconds['auto'] / exhaustive_s:.0%} | {n_pos}+{n_neg} |",
        f"|  | every exhaustive run: {every} | | | | | | | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mt-auto"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data", nargs="+", default=["synthetic"])
    parser.add_argument("--patients", type=int, default=120, help="synthetic.n_patients")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    args = parser.parse_args()
    lines = [
        "| data | auto chose | auto test AUC [95% CI] | best exhaustive | auto - best | auto "
        "time | exhaustive time | ratio | test n (pos+neg) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reasons = []
    for source in args.data:
        name = Path(source).stem if source != "synthetic" else "synthetic"
        measured = run_dataset(
            args.workdir / name, source, args.size, args.epochs, args.patients, args.teachers
        )
        lines += table_rows(name, measured)
        reasons.append(f"- {name}: " + "; ".join(measured["auto"]["auto"]["reasons"]))
    table = "\n".join(lines)
    print(table)
    print("\n".join(reasons))
    write_result(
        f"auto-strategy-{'-'.join(Path(d).stem for d in args.data)}",
        f"{machine_header()}\n\nShared machine (2 cores, other jobs running): times are "
        f"indicative, side by side in one run. Images at {args.size} px, {args.epochs} epochs, "
        f"synthetic.n_patients={args.patients} (synthetic only), "
        f"exhaustive search over {', '.join(args.teachers)} x {', '.join(STRATEGIES)}; auto "
        f"weighs {', '.join(TEACHERS)}. Test AUC intervals: "
        f"Hanley-McNeil 95%.\n\n{table}\n\nWhy auto chose what it chose:\n\n" + "\n".join(reasons),
    )


if __name__ == "__main__":
    main()
