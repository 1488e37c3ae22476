"""Prediction sets and figures by group, measured.

1. Conformal coverage: for the synthetic default and a MedMNIST ``.npz``, a small student
   (``linear_probe``, 64 px, a few epochs) is trained; its calibrated validation probabilities
   give the set rule at coverage 0.90 and 0.95 (:mod:`tasks.evaluation.conformal`, with each
   image's draw from its hash, as evaluate, package and the service do), and the test split
   measures it: coverage with its 95% Wilson interval (which should contain the nominal level),
   the mean set size, and the shares of sets of one class and of both.
2. The worst group: the synthetic generator's two scanners (``SynthScan-A``/``-B`` by patient)
   with the second's opacity at a fraction of the lesion contrast
   (``synthetic.second_scanner_contrast``). For each fraction: the overall test AUC with its
   patient-bootstrap interval and the ``min_clean_auc`` gate, against the per-scanner AUCs and
   the ``min_worst_group_auc`` gate (params.yaml's thresholds), through the same
   :func:`tasks.robustness.gates.gate_verdict` the robustness stage calls.

Usage: ``python -m benchmarks.conformal_groups [--npz ../shared/data/breastmnist.npz]
[--epochs 4] [--fractions 1.0 0.5 0.25] [--scanner-patients 240]``; writes
``benchmarks/results/conformal-groups.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
COVERAGES = (0.90, 0.95)


def trained(root: Path, source: str, epochs: int, extra: list[str]):
    """Ingest ``source`` (``synthetic`` or a ``.npz``) and train a linear-probe student; returns
    ``(params, dataset, evaluation)`` with the evaluation as the evaluate stage computes it."""
    from tasks.config import load_params
    from tasks.data.dataset import load_processed
    from tasks.evaluation.evaluation import evaluate_configured
    from tasks.model.student_io import load_student
    from tasks.stages.ingest import run_ingest
    from tasks.stages.synthesize import run_synthesize
    from tasks.stages.train import run_train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("MEDTRANSFER_PATIENT_SALT", "benchmark-salt")  # no salt file in the repo
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    overrides = [
        f"reports_dir={root / 'reports'}",
        f"data.processed_dir={root / 'processed'}",
        f"data.image_size={SIZE}",
        f"synthetic.output_dir={root / 'synthetic'}",
        f"train.model_dir={root / 'student'}",
        f"train.checkpoint_dir={root / 'checkpoints'}",
        "train.strategy=linear_probe",
        f"train.epochs={epochs}",
        "train.amp=false",
        "eval.gradcam_examples=1",
        *extra,
    ]
    params = load_params(REPO / "params.yaml", overrides)
    if source == "synthetic":
        folder = run_synthesize(params)["dicom_dir"]
        params = params.with_overrides([f"data.source={folder}"])
    else:
        params = params.with_overrides([f"data.source={source}"])
    run_ingest(params, progress=False)
    run_train(params, progress=False)
    model, _ = load_student(params.train.model_dir)
    dataset = load_processed(params.data.processed_dir)
    return params, dataset, evaluate_configured(model, dataset, params.eval, params.seed)


def coverage_rows(name: str, dataset, evaluation) -> list[str]:
    """One markdown row per nominal coverage: calibrated on val, measured on test."""
    from tasks.evaluation.conformal import calibrate, measure, split_uniforms

    draws = split_uniforms(dataset)
    rows = []
    for coverage in COVERAGES:
        rule = calibrate(
            evaluation.probabilities["val"], evaluation.labels["val"], coverage, draws["val"]
        )
        sets = rule.sets(evaluation.probabilities["test"], draws["test"])
        result = measure(sets, evaluation.labels["test"])
        low, high = result.interval
        sizes = sets.sum(axis=1)
        rows.append(
            f"| {name} | {coverage:.2f} | {rule.n_calibration} | {rule.threshold:.3f} | "
            f"{result.covered}/{result.n} = {result.rate:.3f} [{low:.3f}, {high:.3f}] | "
            f"{'yes' if low <= coverage <= high else '**no**'} | {result.mean_size:.2f} | "
            f"{np.mean(sizes == 1):.2f} / {np.mean(sizes == 2):.2f} |"
        )
    return rows


def scanner_rows(fraction: float, params, dataset, evaluation) -> list[str]:
    """The overall AUC and its gate against each scanner's AUC and the worst-group gate."""
    from tasks.evaluation import group_metrics
    from tasks.robustness.gates import gate_verdict

    groups = group_metrics.split_group_rows(dataset, evaluation, params.eval, params.seed)
    scanners = [r for r in groups if r["attribute"] == "manufacturer"]
    worst = group_metrics.worst_group(groups)
    gates = {
        "min_clean_auc": params.gates.min_clean_auc,
        "min_worst_group_auc": params.gates.min_worst_group_auc,
    }
    overall = gate_verdict(
        {},
        evaluation.test.auc,
        {"min_clean_auc": gates["min_clean_auc"]},
        clean_auc_interval=evaluation.intervals["auc"],
    )
    by_group = gate_verdict(
        {},
        evaluation.test.auc,
        {"min_worst_group_auc": gates["min_worst_group_auc"]},
        worst_group=worst,
    )
    low, high = evaluation.intervals["auc"]
    cells = "; ".join(
        f"{r['group']} ({r['n_patients']} pat.) {_n(r['auc'])} [{_n(r['auc_ci_low'])}, "
        f"{_n(r['auc_ci_high'])}]"
        for r in scanners
    )
    return [
        f"| {fraction:.2f} | {evaluation.n_test_patients} | {evaluation.test.auc:.3f} "
        f"[{low:.3f}, {high:.3f}] | {'pass' if overall.passed else 'FAIL'} | {cells} | "
        f"{'pass' if by_group.passed else 'FAIL'} |"
    ]


def _n(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npz", default=str(REPO.parent.parent / "shared/data/breastmnist.npz"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--scanner-patients", type=int, default=240)
    parser.add_argument("--scanners-only", action="store_true", help="skip the coverage part")
    parser.add_argument("--result", default="conformal-groups", help="results file name")
    args = parser.parse_args()
    started = time.perf_counter()
    coverage, scanners, worst_default = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        sources = [("synthetic default", "synthetic"), (Path(args.npz).name, args.npz)]
        sources = [] if args.scanners_only else sources
        for i, (name, source) in enumerate(sources):
            params, dataset, evaluation = trained(Path(scratch) / f"c{i}", source, args.epochs, [])
            coverage += coverage_rows(name, dataset, evaluation)
            if source == "synthetic":
                worst_default = scanner_rows(1.0, params, dataset, evaluation)
        for i, fraction in enumerate(args.fractions):
            extra = [
                f"synthetic.n_patients={args.scanner_patients}",
                f"synthetic.second_scanner_contrast={fraction}",
            ]
            root = Path(scratch) / f"s{i}"
            params, dataset, evaluation = trained(root, "synthetic", args.epochs, extra)
            scanners += scanner_rows(fraction, params, dataset, evaluation)
    body = report(args, coverage, worst_default, scanners, time.perf_counter() - started)
    print(body)
    print(write_result(args.result, body))


def report(
    args, coverage: list[str], default: list[str], scanners: list[str], seconds: float
) -> str:
    scanner_header = (
        "| B's contrast (x lesion) | test patients | overall AUC [95% CI] | min_clean_auc 0.8 "
        "| per scanner AUC [95% CI] | min_worst_group_auc 0.5 |\n| --- | --- | --- | --- | --- | --- |"
    )
    return "\n".join(
        [
            machine_header(),
            f"- student: linear_probe, {SIZE} px, {args.epochs} epochs, temperature-calibrated; "
            f"total run {seconds / 60:.1f} min",
            "",
            "## Conformal coverage on the test split (calibrated on validation, APS)",
            "",
            "| data | nominal | n val | threshold | test coverage [95% Wilson] | contains "
            "nominal | mean set size | sets of 1 / 2 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *coverage,
            "",
            "## Worst group on the synthetic default (both scanners alike)",
            "",
            scanner_header,
            *default,
            "",
            f"## Two scanners, the second's opacity fainter ({args.scanner_patients} patients)",
            "",
            scanner_header,
            *scanners,
        ]
    )


if __name__ == "__main__":
    main()
