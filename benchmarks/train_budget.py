"""Training time end to end with and without a step budget (``train.max_steps``), and the
paired test AUC of the two students: a measurement, not a test.

On an ingested set (``DIR``, e.g. the 4,708-image 128 px chest set of
``python -m benchmarks.train_speed --make-set``), the product's training stage
(:func:`tasks.stages.train.run_train`, the shipped ``params.yaml`` otherwise) runs once per
variant, one after the other in this process, each in its own folder with its own MLflow store:

- ``epochs``: ``train.epochs`` alone (``train.max_steps=null``), the loop as it was;
- ``budget``: ``train.max_steps=N``.

Records each variant's wall time of the whole stage, epochs run, best epoch and validation AUC,
then both students' test AUC with patient-level 95% bootstrap intervals and the paired
difference ``budget - epochs`` on the same resampled patients. A variant already in the work
folder is not trained again, so an interrupted run resumes.

Usage: ``python -m benchmarks.train_budget DIR --max-steps 512 [--workdir /tmp/...]``;
writes ``benchmarks/results/train-budget.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.paired import paired_test_auc
from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent


def train_variant(
    processed: Path, workdir: Path, name: str, max_steps: int | None, overrides: list[str]
) -> dict:
    """Run the training stage on ``processed`` with ``train.max_steps=max_steps`` (and
    ``overrides``, both variants') in ``workdir/name``; returns ``{"name", "max_steps", "seconds", "epochs_run", "best_epoch",
    "best_val_auc", "model_dir"}`` (cached in ``result.json``)."""
    folder = workdir / name
    cached = folder / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from tasks.config import load_params
    from tasks.stages.train import run_train

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(folder / "mlartifacts")
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.processed_dir={processed}",
            f"reports_dir={folder / 'reports'}",
            f"train.model_dir={folder / 'student'}",
            f"train.checkpoint_dir={folder / 'checkpoints'}",
            f"train.max_steps={'null' if max_steps is None else max_steps}",
            *overrides,
        ],
    )
    start = time.perf_counter()
    report = run_train(params, progress=False)
    result = {
        "name": name,
        "max_steps": max_steps,
        "seconds": time.perf_counter() - start,
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "best_val_auc": report["best_val_auc"],
        "model_dir": str(folder / "student"),
        "load_at_end": os.getloadavg(),
    }
    cached.write_text(json.dumps(result, indent=2))
    return result


def table(processed: Path, overrides: list[str], runs: list[dict], paired: dict) -> str:
    """The markdown result: one row per variant and the paired difference."""
    lines = [
        f"Training stage on `{processed}` (shipped params.yaml otherwise; "
        f"{', '.join(f'`{o}`' for o in overrides) or 'no override'}), variants one after "
        "the other in one process; wall time of the whole stage (model build, every epoch with "
        "its validation and checkpoint, saving, MLflow).",
        "",
        "| variant | train.max_steps | epochs run (best) | best val AUC | stage wall s "
        "| test AUC [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        auc = paired[run["name"]]
        lines.append(
            f"| {run['name']} | {run['max_steps'] or '-'} | {run['epochs_run']} "
            f"({run['best_epoch']}) | {run['best_val_auc']:.3f} | {run['seconds']:.0f} "
            f"| {auc['test_auc']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] |"
        )
    difference = paired["difference"]
    ratio = runs[1]["seconds"] / runs[0]["seconds"]
    lines += [
        "",
        f"budget / epochs wall time: **{ratio:.2f}**; test AUC budget - epochs: "
        f"**{difference['estimate']:+.3f}** [{difference['low']:+.3f}, {difference['high']:+.3f}] "
        "(paired patient bootstrap, 1,000 resamples). Load average at each variant's end: "
        + ", ".join(f"{run['name']} {run['load_at_end'][0]:.2f}" for run in runs)
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("processed", type=Path, help="an ingested data set (data.processed_dir)")
    parser.add_argument("--max-steps", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-train-budget"))
    parser.add_argument("--seed", type=int, default=42, help="the bootstrap's seed")
    parser.add_argument("--set", action="append", default=[], help="a params override (both)")
    args = parser.parse_args()
    runs = [
        train_variant(args.processed, args.workdir, "epochs", None, args.set),
        train_variant(args.processed, args.workdir, "budget", args.max_steps, args.set),
    ]
    students = {run["name"]: Path(run["model_dir"]) for run in runs}
    paired = paired_test_auc(args.processed, students, "budget", "epochs", args.seed)
    body = table(args.processed, args.set, runs, paired)
    print(body)
    print(f"written {write_result('train-budget', machine_header() + chr(10) * 2 + body)}")


if __name__ == "__main__":
    main()
