"""Multi-label findings: the synthetic multi-finding set through ingest, train and evaluate, the
per-finding table the product reports (AUC, sensitivity and specificity at each finding's
validation threshold, each with its patient-bootstrap interval; macro and micro AUC), and the
training time against a single-label run on the same images (the first finding as the class).

A measurement on synthetic data (three independent findings), not tuned to; ChestX-ray14 or
CheXpert are where it is meant to be read.

    python -m benchmarks.multilabel [--train 300 --val 150 --test 150 --epochs 4 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.synthetic import write_multi_finding_npz

REPO = Path(__file__).resolve().parents[1]


def single_label_copy(source: Path, target: Path) -> Path:
    """The same images with the first finding's column as a binary class ``(N, 1)``."""
    with np.load(source) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "findings"}
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:, :1]
    np.savez(target, **arrays)
    return target


def run(source: Path, root: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """Ingest, train and evaluate ``source`` under ``root``; the metrics report and the
    training wall time in seconds."""
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.train import run_train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.source={source}",
            "data.labels_csv=null",
            f"data.image_size={args.size}",
            f"data.processed_dir={root / 'processed'}",
            f"reports_dir={root / 'reports'}",
            f"train.epochs={args.epochs}",
            f"train.strategy={args.strategy}",
            "train.teacher=efficientnet-lite0",
            f"train.model_dir={root / 'student'}",
            f"train.checkpoint_dir={root / 'checkpoints'}",
            "eval.calibration=temperature",
        ],
    )
    run_ingest(params, progress=False)
    start = time.perf_counter()
    run_train(params, progress=False)
    seconds = time.perf_counter() - start
    return run_evaluate(params), seconds


def cell(value: float | None, ci: dict | None) -> str:
    if value is None:
        return "n/a"
    if not ci or ci.get("low") is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def table(report: dict) -> str:
    """The per-finding table and the macro and micro AUC as markdown."""
    test = report["test"]
    lines = [
        f"Test split: {test['n_images']} images of {test['n_patients']} patients; 95% intervals "
        f"by bootstrap over patients ({report['bootstrap']['resamples']} resamples).",
        "",
        f"- macro AUC: {cell(test['macro_auc'], test.get('macro_auc_ci95'))}",
        f"- micro AUC: {cell(test['micro_auc'], test.get('micro_auc_ci95'))}",
        "",
        "| finding | positives / n | threshold (val) | AUC | sensitivity | specificity |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    for row in test["findings"]:
        cells = [cell(row[m], row.get(f"{m}_ci95")) for m in ("auc", "sensitivity", "specificity")]
        lines.append(
            f"| {row['finding']} | {row['n_positive']} / {row['n_known']} | "
            f"{row['threshold']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--findings", type=int, default=3)
    parser.add_argument("--strategy", default="linear_probe")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    times: dict[str, list[float]] = {"multi-label": [], "single-label": []}
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        multi = write_multi_finding_npz(base / "m.npz", sizes, args.size, 0, args.findings)
        single = single_label_copy(multi, base / "s.npz")
        for repeat in range(args.repeats):  # alternated, so load drifts hit both alike
            for kind, source in (("multi-label", multi), ("single-label", single)):
                root = base / f"{kind}-{repeat}"
                root.mkdir()
                reports[kind], seconds = run(source, root, args)
                times[kind].append(seconds)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    single_auc = reports["single-label"]["test"]
    body = "\n\n".join(
        [
            machine_header(),
            f"Synthetic multi-finding set ({args.findings} independent findings, {sizes}, "
            f"{args.size} px), {args.strategy}, {args.epochs} epochs, temperature per finding.",
            table(reports["multi-label"]),
            "Training time (the train stage, wall clock, alternated runs; median of "
            f"{args.repeats}): multi-label {medians['multi-label']:.1f} s "
            f"({', '.join(f'{t:.1f}' for t in times['multi-label'])}), single-label on the "
            f"same images (first finding as the class) {medians['single-label']:.1f} s "
            f"({', '.join(f'{t:.1f}' for t in times['single-label'])}); ratio "
            f"{medians['multi-label'] / medians['single-label']:.2f}. The single-label run's "
            f"test AUC: {cell(single_auc['auc'], (single_auc.get('ci95') or {}).get('auc'))}.",
        ]
    )
    print(body)
    print(write_result("multilabel", body))


if __name__ == "__main__":
    main()
