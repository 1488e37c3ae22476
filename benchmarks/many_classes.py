"""Many classes, reported per class: the synthetic 3-class set through ingest, train and
evaluate, and the per-class table the product reports (AUC one vs rest, sensitivity,
precision, each with its patient-bootstrap interval; balanced accuracy; confusion counts).

A measurement of the product on the only multi-class data here (synthetic, not tuned to);
real many-class sets (fundus grades, dermoscopy) are where it is meant to be read.

    python -m benchmarks.many_classes [--train 300 --val 90 --test 150 --epochs 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.synthetic import THREE_CLASS_NAMES, write_three_class_npz

REPO = Path(__file__).resolve().parents[1]


def run(split_sizes: dict[str, int], epochs: int, size: int, strategy: str) -> tuple[dict, float]:
    """Ingest, train and evaluate the 3-class set in a temporary folder; returns the metrics
    report and the training wall time in seconds."""
    import os

    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.train import run_train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
        source = write_three_class_npz(root / "three.npz", split_sizes, size, seed=0)
        params = load_params(
            REPO / "params.yaml",
            [
                f"data.source={source}",
                "data.labels_csv=null",
                f"data.image_size={size}",
                f"data.processed_dir={root / 'processed'}",
                f"reports_dir={root / 'reports'}",
                f"train.epochs={epochs}",
                f"train.strategy={strategy}",
                f"train.model_dir={root / 'student'}",
                f"train.checkpoint_dir={root / 'checkpoints'}",
            ],
        )
        run_ingest(params, progress=False)
        start = time.perf_counter()
        run_train(params, progress=False)
        seconds = time.perf_counter() - start
        return run_evaluate(params), seconds


def table(report: dict) -> str:
    """The per-class table and the macro figures as markdown."""
    test = report["test"]

    def cell(value: float | None, ci: dict | None) -> str:
        if value is None:
            return "n/a"
        if not ci or ci.get("low") is None:
            return f"{value:.3f}"
        return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    ci = test["ci95"]
    lines = [
        f"Test split: {test['n_images']} images of {test['n_patients']} patients; 95% intervals "
        f"by bootstrap over patients ({report['bootstrap']['resamples']} resamples).",
        "",
        f"- macro AUC (one vs rest): {cell(test['auc'], ci.get('auc'))}",
        f"- balanced accuracy: {cell(test['balanced_accuracy'], ci.get('balanced_accuracy'))}",
        f"- accuracy: {cell(test['accuracy'], ci.get('accuracy'))}",
        "",
        "| class | n | AUC (one vs rest) | sensitivity | precision |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for row, name in zip(test["per_class"], THREE_CLASS_NAMES, strict=True):
        cells = [cell(row[m], row.get(f"{m}_ci95")) for m in ("auc", "sensitivity", "precision")]
        lines.append(f"| {row['class']} ({name}) | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Confusion (rows true, columns predicted): " + str(test["confusion"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--val", type=int, default=90)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--strategy", default="linear_probe")
    args = parser.parse_args()
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    report, seconds = run(sizes, args.epochs, args.size, args.strategy)
    body = "\n\n".join(
        [
            machine_header(),
            f"Synthetic 3-class set ({sizes}, {args.size} px), {args.strategy}, "
            f"{args.epochs} epochs; training took {seconds:.0f} s.",
            table(report),
        ]
    )
    print(body)
    print(write_result("many-classes", body))


if __name__ == "__main__":
    main()
