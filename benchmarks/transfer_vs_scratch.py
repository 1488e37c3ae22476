"""The product's central claim, measured: at equal budget a transferred (``partial``) student
beats one trained from scratch, on the synthetic default. A measurement, not a test.

For each seed (the project's ``seed``: patient split, initialisation, batch order), in a fresh
work folder with its own MLflow store: ingest 80 synthetic patients at 64 px, then
``train.compare=[partial,scratch]`` for 6 epochs (the setting of the former xfail test
``test_transfer_beats_scratch_on_the_synthetic_default``). Records both students' test AUC
with its patient-level 95% interval and the paired difference; across seeds, the mean
difference with its 95% t-interval. A seed whose result is already in the work folder is not
run again, so an interrupted run resumes.

Usage: ``python -m benchmarks.transfer_vs_scratch [--seeds 0 1 2] [--workdir /tmp/...]``;
writes ``benchmarks/results/transfer-vs-scratch.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.paired import paired_test_auc
from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
SETTING = [
    "synthetic.n_patients=80",
    "synthetic.size=128",
    "data.image_size=64",
    "train.epochs=6",
    "train.compare=[partial,scratch]",
    # the measured setting: a fixed teacher and strategy (auto, the default, refuses compare)
    "train.teacher=efficientnet-lite0",
    "train.strategy=partial",
]
# Student t quantiles (0.975) for n - 1 degrees of freedom, n = 2..10.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_seed(seed: int, workdir: Path) -> dict:
    """Ingest and train both strategies at ``seed`` in ``workdir/seed-<seed>``; returns
    ``{"seed", "seconds", "partial": {...}, "scratch": {...}}`` (cached in ``result.json``)."""
    folder = workdir / f"seed-{seed}"
    cached = folder / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from tasks.config import load_params
    from tasks.stages.ingest import run_ingest
    from tasks.stages.train import run_train

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(folder / "mlartifacts")
    os.environ.setdefault("MEDTRANSFER_PATIENT_SALT", "benchmark-salt")
    params = load_params(
        REPO / "params.yaml",
        [
            f"seed={seed}",
            "data.source=synthetic",
            "data.labels_csv=null",
            f"data.processed_dir={folder / 'processed'}",
            f"reports_dir={folder / 'reports'}",
            f"synthetic.output_dir={folder / 'synthetic'}",
            f"train.model_dir={folder / 'models/student'}",
            f"train.checkpoint_dir={folder / 'models/checkpoints'}",
            *SETTING,
        ],
    )
    start = time.perf_counter()
    run_ingest(params, progress=False)
    report = run_train(params, progress=False)
    result = {"seed": seed, "seconds": time.perf_counter() - start}
    result.update(paired_intervals(params, [run["strategy"] for run in report["runs"]], seed))
    cached.write_text(json.dumps(result, indent=2))
    return result


def paired_intervals(params, strategies: list[str], seed: int, resamples: int = 1000) -> dict:
    """Each saved strategy's test AUC with its patient-level 95% bootstrap interval, and the
    ``partial - scratch`` difference's, both students scored on the same resampled patients."""
    from tasks.model.student_io import STRATEGIES_SUBDIR

    folder = Path(params.train.model_dir) / STRATEGIES_SUBDIR
    students = {strategy: folder / strategy for strategy in strategies}
    return paired_test_auc(
        params.data.processed_dir, students, "partial", "scratch", seed, resamples
    )


def summary(results: list[dict]) -> tuple[float, float, float]:
    """Mean paired difference (partial - scratch test AUC) and its 95% t-interval."""
    diffs = np.array([r["partial"]["test_auc"] - r["scratch"]["test_auc"] for r in results])
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T975[len(diffs) - 1] * float(diffs.std(ddof=1)) / np.sqrt(len(diffs))
    return mean, mean - half, mean + half


def table(results: list[dict]) -> str:
    def auc(run: dict) -> str:
        return f"{run['test_auc']:.3f} [{run['low']:.3f}, {run['high']:.3f}]"

    mean, low, high = summary(results)
    lines = [
        "Setting: " + ", ".join(f"`{s}`" for s in SETTING) + "; CPU, one process.",
        "",
        machine_header(),
        "",
        "| seed | partial test AUC [95% CI] | scratch test AUC [95% CI] "
        "| partial - scratch [paired patient-bootstrap 95% CI] | s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        diff = r["partial"]["test_auc"] - r["scratch"]["test_auc"]
        paired = r["difference"]
        lines.append(
            f"| {r['seed']} | {auc(r['partial'])} | {auc(r['scratch'])} | {diff:+.3f} "
            f"[{paired['low']:+.3f}, {paired['high']:+.3f}] | {r['seconds']:.0f} |"
        )
    interval = (
        f"95% t-interval [{low:+.3f}, {high:+.3f}]"
        if len(results) > 1
        else (
            "no interval across seeds from one seed: the paired patient-bootstrap interval above "
            "is the evidence"
        )
    )
    lines += [
        "",
        f"Mean paired difference over {len(results)} seed(s): **{mean:+.3f}**, {interval}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/medtransfer-transfer-vs-scratch")
    )
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.workdir))
        print(json.dumps(results[-1]))
    body = table(results)
    print(body)
    print(f"written {write_result('transfer-vs-scratch', body)}")


if __name__ == "__main__":
    main()
