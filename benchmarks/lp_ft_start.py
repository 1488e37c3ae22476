"""LP-FT's start, old against new, side by side on one processed dataset: a measurement.

``old`` is lp_ft as it was: the probe's L2 is ``train.weight_decay``, BatchNorm uses batch
statistics while fine-tuning, and fine-tuning runs at the full ``train.lr``. ``new`` is the
shipped lp_ft: the L2 chosen on validation from ``PROBE_L2_GRID``, BatchNorm statistics fixed,
fine-tuning at ``lr * backbone_lr_factor``. Per variant: the probe's L2, training and
validation loss, each epoch's training loss, validation loss and AUC, and the test AUC of the
epoch model selection keeps (with its 95% patient-bootstrap interval).

Usage, in a project folder whose dataset is ingested (e.g. ``medtransfer synthesize &&
medtransfer ingest -S data.image_size=64``): ``python -m benchmarks.lp_ft_start --epochs 3
-S data.image_size=64``. Writes ``benchmarks/results/lp-ft-start-run.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.dataset import load_processed
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.evaluation.metrics import patient_weights, percentile_interval, roc_auc, weighted_auc
from tasks.model.predict import run_model
from tasks.model.student import Student
from tasks.training import features, strategies
from tasks.training.types import FitConfig


class _Rows:
    """A recorder that keeps the epoch rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def fit_started(self, *args) -> None:
        pass

    def epoch_ended(self, row: dict) -> None:
        self.rows.append(row)
        print("   ", {k: round(v, 4) for k, v in row.items()}, flush=True)

    def fit_ended(self, result) -> None:
        pass


def _as_old(params) -> None:
    """Put lp_ft back as it was (module attributes only; :func:`_as_new` undoes it)."""
    grid = (params.train.weight_decay,)
    fit = features.fit_probe_on_validation
    strategies.fit_probe_on_validation = lambda *a, **k: fit(*a, **{**k, "grid": grid})
    Student.frozen_statistics = lambda self: []
    strategies._base_lr = lambda config, strategy: config.lr


def run_variant(params, dataset, name: str, epochs: int) -> dict:
    """Train lp_ft (``old`` or ``new``) for ``epochs``; returns its figures."""
    originals = (strategies.fit_probe_on_validation, Student.frozen_statistics, strategies._base_lr)
    if name == "old":
        _as_old(params)
    config = replace(params.train, strategy="lp_ft", epochs=epochs, patience=epochs + 1)
    torch.manual_seed(params.seed)
    model = strategies.build_model(config, "lp_ft", len(dataset.classes))
    rows, start = _Rows(), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            result = strategies.fit_student(
                model, dataset, config, FitConfig.from_train(config, params.seed, folder, False),
                [rows], strategy="lp_ft", train_idx=dataset.indices("train"),
            )  # fmt: skip
    finally:
        strategies.fit_probe_on_validation, Student.frozen_statistics = originals[:2]
        strategies._base_lr = originals[2]
    images, labels = dataset.subset("test")
    probabilities = run_model(model.eval(), torch.from_numpy(uint8_to_model_pixels(images)))
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    weights = patient_weights(patients, 1000, params.seed)
    low, high = percentile_interval(weighted_auc(labels, probabilities, weights))
    return {
        "variant": name,
        "probe": result.lp_stage,
        "rows": rows.rows,
        "best_epoch": result.best_epoch,
        "test_auc": (roc_auc(labels, probabilities), low, high),
        "seconds": time.perf_counter() - start,
    }


def table(results: list[dict]) -> str:
    """The side-by-side table, markdown."""
    lines = [
        "| variant | probe L2 | probe train / val loss | epoch: train loss, val loss, val AUC "
        "| kept epoch | test AUC [95% CI] | seconds |",
        "| --- | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for r in results:
        epochs = "; ".join(
            f"{int(row['epoch'])}: {row['train_loss']:.2f}, {row['val_loss']:.2f}, "
            f"{row['val_auc']:.3f}"
            for row in r["rows"]
        )
        auc, low, high = r["test_auc"]
        probe = r["probe"]
        lines.append(
            f"| {r['variant']} | {probe['l2']:g} | {probe['train_loss']:.3f} / "
            f"{probe['val_loss']:.3f} | {epochs} | {r['best_epoch']} | {auc:.3f} [{low:.3f}, "
            f"{high:.3f}] | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["new", "old"])
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    params = load_params("params.yaml", args.overrides)
    dataset = load_processed(params.data.processed_dir)
    results = [run_variant(params, dataset, name, args.epochs) for name in args.variants]
    body = f"{machine_header()}\n\nOverrides: {args.overrides}\n\n{table(results)}\n"
    print(body)
    write_result("lp-ft-start-run", body)


if __name__ == "__main__":
    main()
