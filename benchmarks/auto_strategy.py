"""``train.strategy: auto`` + ``train.teacher: auto`` against the exhaustive search: a measurement.

For each data set (ingested once into its own work folder), in one process, side by side:

1. **auto**: the product's rule (:func:`tasks.transfer.auto.apply_auto`: evidence, candidates,
   pilots by successive halving with their validation AUC and inherited exposure), then the
   chosen candidate trained for ``--epochs``;
2. **exhaustive**: every bundled teacher x ``linear_probe``, ``partial`` 1/3/5/8 blocks,
   ``full`` and ``lp_ft``, each trained for ``--epochs`` the same way.

Every student is judged on the test split: test AUC with its 95% patient-bootstrap interval,
and two of the promotion gates as the robustness stage decides them: clean AUC (interval's
lower bound >= ``gates.min_clean_auc``) and the teacher-transfer gate (the worse of the
untargeted and mimicry success rates at ``gates.teacher_transfer_eps_255``, Wilson upper bound
<= ``gates.max_teacher_transfer_success``) on up to ``--attack-images`` test images. The
universal-perturbation gate is not measured here (it passed every strategy by a wide margin in
robustness-strategies.md). Writes ``benchmarks/results/auto-strategy-<data>.md``.

Usage: ``nice -n 10 python -m benchmarks.auto_strategy --data /path/breastmnist.npz --size 32
--epochs 2``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.report import machine_header, write_result
from tasks.config import Params, load_params
from tasks.data.dataset import load_processed
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.model.predict import run_model
from tasks.stages.ingest import run_ingest
from tasks.transfer.auto import apply_auto
from tasks.transfer.candidates import MAX_CANDIDATES
from tasks.transfer.pilots import Candidate, ExposureProbe, Pilot, pilot_fit, val_auc_interval
from tasks.transfer.selection import candidate_teachers

REPO = Path(__file__).resolve().parent.parent
DEPTHS = (("linear_probe", 0), *(("partial", k) for k in (1, 3, 5, 8)), ("full", 16), ("lp_ft", 16))


def prepare(workdir: Path, source: str, size: int, epochs: int, patients: int) -> Params:
    """The work folder's parameters, its dataset ingested once."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.processed_dir={workdir / 'processed'}",
        f"reports_dir={workdir / 'reports'}",
        f"data.image_size={size}",
        f"train.epochs={epochs}",
        f"train.checkpoint_dir={workdir / 'checkpoints'}",
    ]
    if source == "synthetic":
        overrides += [
            "data.source=synthetic",
            "data.labels_csv=null",
            f"synthetic.output_dir={workdir / 'synthetic'}",
            f"synthetic.n_patients={patients}",
        ]
    else:
        overrides += [f"data.source={source}"]
    params = load_params(REPO / "params.yaml", overrides)
    if not (workdir / "processed" / "dataset.json").is_file():
        run_ingest(params, progress=False)
    return params


def judge(model: torch.nn.Module, teacher: str, params: Params, dataset, probe) -> dict:
    """Test AUC with its patient-bootstrap interval and the two gates' verdicts."""
    images, labels = dataset.subset("test")
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    pixels = torch.from_numpy(uint8_to_model_pixels(images))
    auc, low, high = val_auc_interval(run_model(model, pixels, batch_size=64), labels, patients, 0)
    pilot = Pilot(Candidate(teacher, "", 0, ""))
    probe.measure(model, teacher, pilot)
    minimum = params.gates.min_clean_auc
    clean_ok = minimum is None or low >= minimum
    return {
        "test_auc": auc,
        "test_low": low,
        "test_high": high,
        "exposure": pilot.exposure,
        "exposure_high": pilot.exposure_high,
        "exposure_n": pilot.exposure_n,
        "gates": bool(clean_ok and pilot.passes),
    }


def run_dataset(params: Params, teachers: list[str], attack_images: int) -> dict:
    """auto, then every exhaustive candidate, each trained and judged; times in seconds."""
    dataset = load_processed(params.data.processed_dir)
    probe = ExposureProbe(params, dataset, split="test", limit=attack_images)
    start = time.perf_counter()
    chosen_params, choice = apply_auto(params, progress=False)
    train = chosen_params.train
    candidate = Candidate(train.teacher, train.strategy, train.unfreeze_blocks, "auto")
    model = pilot_fit(params, dataset, candidate, params.train.epochs, [])
    auto_seconds = time.perf_counter() - start
    auto = {**judge(model, train.teacher, params, dataset, probe), "seconds": auto_seconds}
    auto |= {"label": candidate.label, "choice": choice.to_dict() if choice else None}
    exhaustive = []
    for teacher in teachers:
        for strategy, depth in DEPTHS:
            candidate = Candidate(teacher, strategy, depth, "exhaustive")
            start = time.perf_counter()
            model = pilot_fit(params, dataset, candidate, params.train.epochs, [])
            seconds = time.perf_counter() - start
            row = {**judge(model, teacher, params, dataset, probe), "seconds": seconds}
            exhaustive.append({**row, "label": candidate.label})
            print(json.dumps(exhaustive[-1]), flush=True)
    labels = dataset.labels[dataset.indices("test")]
    return {"auto": auto, "exhaustive": exhaustive, "n_test": (int(labels.sum()), len(labels))}


def _interval(row: dict) -> str:
    return f"{row['test_auc']:.3f} [{row['test_low']:.3f}, {row['test_high']:.3f}]"


def table_rows(name: str, measured: dict) -> list[str]:
    """Markdown rows for one data set."""
    auto, rows = measured["auto"], measured["exhaustive"]
    passing = [r for r in rows if r["gates"]]
    best = max(passing or rows, key=lambda r: r["test_auc"])
    exhaustive_s = sum(r["seconds"] for r in rows)
    choice = auto["choice"] or {}
    positives, n = measured["n_test"]
    every = "; ".join(
        f"{r['label']} {r['test_auc']:.3f} {'pass' if r['gates'] else 'FAIL'} "
        f"(exp. {r['exposure']:.2f}<={r['exposure_high']:.2f})"
        for r in rows
    )
    return [
        f"| {name} | {auto['label']} ({choice.get('confidence', '?')}) | {_interval(auto)} | "
        f"{'pass' if auto['gates'] else 'FAIL'} (exposure {auto['exposure']:.2f}, upper "
        f"{auto['exposure_high']:.2f}) | {best['label']}: {_interval(best)}"
        f"{'' if passing else ' (none passes)'} | {auto['test_auc'] - best['test_auc']:+.3f} | "
        f"{auto['seconds']:.0f} s | {exhaustive_s:.0f} s | {auto['seconds'] / exhaustive_s:.0%} "
        f"| {positives}+{n - positives} |",
        f"|  | every exhaustive run: {every} | | | | | | | | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mt-auto-bench"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", nargs="+", default=["synthetic"])
    parser.add_argument("--patients", type=int, default=60, help="synthetic.n_patients")
    parser.add_argument("--attack-images", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="ingest again")
    args = parser.parse_args()
    teachers = candidate_teachers("auto", None)
    lines = [
        "| data | auto chose (confidence) | auto test AUC [95% CI] | auto gates | best "
        "exhaustive that passes | auto - best | auto time | exhaustive time | ratio | test n "
        "(pos+neg) |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reasons = []
    for source in args.data:
        name = Path(source).stem if source != "synthetic" else "synthetic"
        if args.fresh:
            shutil.rmtree(args.workdir / name, ignore_errors=True)
        params = prepare(args.workdir / name, source, args.size, args.epochs, args.patients)
        measured = run_dataset(params, teachers, args.attack_images)
        lines += table_rows(name, measured)
        choice = measured["auto"]["choice"] or {}
        reasons.append(f"- {name}: " + "; ".join(choice.get("reasons", [])))
        (args.workdir / f"{name}.json").write_text(json.dumps(measured, default=str))
    table = "\n".join(lines)
    print(table, "\n".join(reasons), sep="\n")
    write_result(
        f"auto-strategy-{'-'.join(Path(d).stem for d in args.data)}",
        f"{machine_header()}\n\nOne process, side by side, `nice -n 10` on the shared 2-core "
        f"machine. Images at {args.size} px, {args.epochs} epochs for every student (auto's "
        f"final one and each exhaustive one), synthetic.n_patients={args.patients} (synthetic "
        f"only); auto's pilots within train.auto_budget_minutes={params.train.auto_budget_minutes}"
        f" (at most {MAX_CANDIDATES} candidates). Exhaustive: {', '.join(teachers)} x "
        f"linear_probe, partial 1/3/5/8, full, lp_ft. Test AUC: 95% patient-bootstrap "
        f"interval. Gates: clean AUC lower bound and the teacher-transfer gate (Wilson upper "
        f"bound, up to {args.attack_images} test images); not the universal gate.\n\n{table}\n\n"
        "Why auto chose what it chose:\n\n" + "\n".join(reasons),
    )


if __name__ == "__main__":
    main()
