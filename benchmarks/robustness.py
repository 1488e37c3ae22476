"""Time the robustness stage at its defaults on a trained student and a large test split.

In a work folder holding a copy of the project's params.yaml, runs the product's own commands:
``medtransfer synthesize`` (enough patients for a test split of ``--test-images``, with
``data.test_fraction=0.3`` so that training stays short), ``ingest``, ``train`` (defaults), then
times ``medtransfer robustness -S robustness.max_samples=<test images>``: every default attack
at every default budget on the student and on the frozen-teacher probe, the probe's fitting and
the clean evaluation. A trained student matters: each white-box line only attacks the images
no smaller budget fooled, so the cost depends on how quickly the model falls.

``--baseline PATH`` (a checkout of another commit, e.g. ``git worktree add /tmp/base <rev>``)
runs the same command with that code on the same student and images, side by side: first the
baseline, then this code, ``--repeat`` times each. Steps whose report exists are not redone.
Writes ``benchmarks/results/<--name>.md`` (default ``robustness-stage``).

Usage: ``python -m benchmarks.robustness [--workdir /tmp/medtransfer-robustness]
[--test-images 624] [--baseline /tmp/base] [--repeat 1] [--prepare-only]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
TEST_FRACTION = 0.3


def medtransfer(workdir: Path, args: list[str], code: Path = REPO) -> float:
    """Run one ``medtransfer`` command in ``workdir`` with the package at ``code``; returns its
    seconds. A failing command raises with its stderr's tail."""
    command = [sys.executable, "-m", "flows.cli", *args, "-q"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def prepare(workdir: Path, test_images: int, params: dict) -> dict[str, float]:
    """Synthesize, ingest and train in ``workdir`` unless their reports exist; returns the
    seconds of the steps that ran."""
    synthetic = params["synthetic"]
    per_patient = (synthetic["images_per_patient_min"] + synthetic["images_per_patient_max"]) / 2
    # 15% more patients than the mean needs, so that the test split holds at least test_images
    patients = math.ceil(1.15 * test_images / (per_patient * TEST_FRACTION))
    data = [f"synthetic.n_patients={patients}", f"data.test_fraction={TEST_FRACTION}"]
    seconds = {}
    if not (workdir / "reports" / "ingest.json").is_file():
        seconds["synthesize"] = medtransfer(workdir, ["synthesize", *_set(data)])
        seconds["ingest"] = medtransfer(workdir, ["ingest", *_set(data)])
    if not (workdir / "reports" / "train.json").is_file():
        seconds["train"] = medtransfer(workdir, ["train"])
    return seconds


def _set(overrides: list[str]) -> list[str]:
    return [part for value in overrides for part in ("-S", value)]


def time_stage(workdir: Path, test_images: int, label: str, code: Path) -> tuple[float, dict]:
    """One timed ``medtransfer robustness`` with the code at ``code``; returns its seconds and
    its report (written under ``reports/<label>``)."""
    reports_dir = f"reports/{label}"
    seconds = medtransfer(
        workdir,
        [
            "robustness",
            *_set([f"robustness.max_samples={test_images}", f"reports_dir={reports_dir}"]),
        ],
        code,
    )
    return seconds, json.loads((workdir / reports_dir / "robustness.json").read_text())


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-robustness"))
    parser.add_argument("--test-images", type=int, default=624)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--name", default="robustness-stage", help="result file name")
    parser.add_argument(
        "--prepare-only", action="store_true", help="train, time nothing (time on a quiet machine)"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "params.yaml").is_file():
        shutil.copy(REPO / "params.yaml", args.workdir)
    params = yaml.safe_load((args.workdir / "params.yaml").read_text())
    prepared = prepare(args.workdir, args.test_images, params)
    for step, seconds in prepared.items():
        print(f"{step}: {seconds:.0f} s", flush=True)
    if args.prepare_only:
        return

    codes = ([("baseline", args.baseline)] if args.baseline else []) + [("this code", REPO)]
    timings: dict[str, list[float]] = {label: [] for label, _ in codes}
    reports: dict[str, dict] = {}
    for run in range(args.repeat):
        for label, code in codes:
            seconds, reports[label] = time_stage(
                args.workdir, args.test_images, f"{label.replace(' ', '-')}-{run}", code
            )
            timings[label].append(seconds)
            print(f"{label} run {run + 1}: {seconds:.0f} s", flush=True)
    write_result(args.name, _body(args, params, prepared, timings, reports))


def _body(args, params: dict, prepared: dict, timings: dict, reports: dict) -> str:
    """The result file's text: setup, one table row per code, the student's figures."""
    config = params["robustness"]
    rows = [
        "| code | images attacked | runs | median s | min s | images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, seconds in timings.items():
        median = statistics.median(seconds)
        n = reports[label]["n_examples"]
        rows.append(
            f"| {label} | {n} | {len(seconds)} | {median:.0f} | {min(seconds):.0f} | "
            f"{n / median:.2f} |"
        )
    if args.baseline and len(timings) == 2:
        ratio = statistics.median(timings["this code"]) / statistics.median(timings["baseline"])
        rows.append(f"\nthis code / baseline (medians): {ratio:.2f}")
    table = reports["this code"]["table"]
    apgd = ", ".join(f"{row['eps_255']:g}/255: {row['robust_acc_apgd']:.2f}" for row in table)
    setup = ", ".join(f"{step} {s:.0f} s" for step, s in prepared.items()) or "reused"
    return (
        f"{machine_header()}\n\n`medtransfer robustness` at the defaults of params.yaml "
        f"(budgets {config['epsilons_255']}/255, PGD {config['pgd_steps']} steps, APGD-CE "
        f"{config['apgd_steps']} steps, universal perturbation {config['universal_images']} "
        f"crops x {config['universal_steps']} steps, frozen-teacher probe "
        f"{config['reference_probe']}), `robustness.max_samples={args.test_images}`, on the "
        f"test split of a synthetic set ({params['data']['image_size']} px) with "
        f"`data.test_fraction={TEST_FRACTION}`, student trained at the defaults "
        f"({params['train']['strategy']}). Preparation: {setup}. Baseline: "
        f"{args.baseline or 'none'}.\n\n" + "\n".join(rows) + f"\n\nThe student's worst-case "
        f"white-box accuracy: {apgd}."
    )


if __name__ == "__main__":
    main()
