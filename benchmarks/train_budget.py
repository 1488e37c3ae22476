"""Training time end to end: the old loop, the new loop, the new loop under a step budget
(``train.max_steps``), and the paired test AUC of their students: a measurement, not a test.

On an ingested set (``DIR``, e.g. the 4,708-image 128 px chest set of
``python -m benchmarks.train_speed --make-set``), the product's training stage
(:func:`tasks.stages.train.run_train`, each checkout's own ``params.yaml`` otherwise) runs once
per variant, one after the other, each in a process of its own with its own folder and MLflow
store:

- ``old loop`` (with ``--baseline CHECKOUT``, a checkout of the code before the change, e.g. a
  ``git worktree`` of ``77e5f15^1``): per-image MONAI augmentation, no channels_last on the CPU,
  ``train.epochs`` alone;
- ``epochs`` (with ``--with-epochs``): this checkout, ``train.max_steps=null``;
- ``budget`` (with ``--max-steps N``): this checkout, ``train.max_steps=N``;
- any ``--variant NAME=KEY=VALUE[,KEY=VALUE]``: this checkout with those overrides (e.g.
  ``partial5=train.strategy=partial,train.unfreeze_blocks=5``).

Records each variant's wall time of the whole stage, epochs run, best epoch and validation AUC,
then every student's test AUC with its patient-level 95% bootstrap interval and the paired
difference of every other variant against the first on the same resampled patients. A variant
already in the work folder is not trained again, so an interrupted run resumes.

Usage: ``python -m benchmarks.train_budget DIR [--max-steps 512] [--variant ...]
[--baseline CHECKOUT] [--with-epochs] [--workdir /tmp/...]``; writes
``benchmarks/results/train-budget.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.paired import paired_test_auc
from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
# What one variant's process runs, in its checkout: that checkout's params.yaml and training
# stage; prints the figures as one JSON line.
TRAIN_ONE = """
import json, sys, time
from tasks.config import load_params
from tasks.stages.train import run_train
params = load_params("params.yaml", json.loads(sys.argv[1]))
start = time.perf_counter()
report = run_train(params, progress=False)
seconds = time.perf_counter() - start
keys = ("epochs_run", "best_epoch", "best_val_auc")
print(json.dumps({"seconds": seconds, **{key: report[key] for key in keys}}))
"""


@dataclass
class Variant:
    """One training to time: its name, the checkout whose code runs it, its overrides."""

    name: str
    checkout: Path
    overrides: list[str] = field(default_factory=list)


def train_variant(variant: Variant, processed: Path, workdir: Path, shared: list[str]) -> dict:
    """Run ``variant``'s training stage on ``processed`` (with the ``shared`` overrides) in
    ``workdir/<name>``; returns ``{"name", "overrides", "seconds", "epochs_run", "best_epoch",
    "best_val_auc", "model_dir", "load_at_end"}`` (cached in ``result.json``)."""
    folder = workdir / variant.name.replace(" ", "-")
    cached = folder / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.processed_dir={processed}",
        f"reports_dir={folder / 'reports'}",
        f"train.model_dir={folder / 'student'}",
        f"train.checkpoint_dir={folder / 'checkpoints'}",
        *shared,
        *variant.overrides,
    ]
    env = os.environ | {
        "PYTHONPATH": str(variant.checkout),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "MEDTRANSFER_ARTIFACT_ROOT": str(folder / "mlartifacts"),
    }
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_ONE, json.dumps(overrides)],
        cwd=variant.checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    (folder / "train.log").write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{variant.name} failed; see {folder / 'train.log'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {
        "name": variant.name,
        "overrides": variant.overrides,
        "model_dir": str(folder / "student"),
        "load_at_end": os.getloadavg(),
    }
    cached.write_text(json.dumps(result, indent=2))
    return result


def named_variant(spec: str) -> Variant:
    """``NAME=KEY=VALUE[,KEY=VALUE]`` (``--variant``): a variant of this checkout."""
    name, _, overrides = spec.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--variant {spec!r}: write NAME=KEY=VALUE[,KEY=VALUE]")
    return Variant(name, REPO, overrides.split(","))


def table(processed: Path, shared: list[str], runs: list[dict], paired: dict) -> str:
    """The markdown result: one row per variant and the paired difference to the first."""
    first = runs[0]
    lines = [
        f"Training stage on `{processed}` ({', '.join(f'`{o}`' for o in shared) or 'no override'}"
        "; each checkout's params.yaml otherwise), variants one after the other, each in its own "
        "process; wall time of the whole stage (model build, every epoch with its validation "
        "and checkpoint, saving, MLflow).",
        "",
        "| variant | overrides | epochs run (best) | best val AUC | stage wall s | ratio "
        f"| test AUC [95% CI] | - {first['name']} [paired 95% CI] |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        auc = paired[run["name"]]
        against = paired["against"].get(run["name"])
        lines.append(
            f"| {run['name']} | {', '.join(run['overrides']) or '-'} | {run['epochs_run']} "
            f"({run['best_epoch']}) | {run['best_val_auc']:.3f} | {run['seconds']:.0f} "
            f"| {run['seconds'] / first['seconds']:.2f} "
            f"| {auc['test_auc']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] | "
            + (
                f"{against['estimate']:+.3f} [{against['low']:+.3f}, {against['high']:+.3f}] |"
                if against
                else "- |"
            )
        )
    lines += [
        "",
        "Differences: the same test patients resampled for both students (paired patient "
        "bootstrap, 1,000 resamples). Load average at each variant's end: "
        + ", ".join(f"{run['name']} {run['load_at_end'][0]:.2f}" for run in runs)
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("processed", type=Path, help="an ingested data set (data.processed_dir)")
    parser.add_argument("--max-steps", type=int, help="the budget variant's train.max_steps")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="another variant of this checkout, e.g. gpu=train.device=cuda",
    )
    parser.add_argument("--baseline", type=Path, help="a checkout of the old loop's code")
    parser.add_argument("--with-epochs", action="store_true", help="the new loop, no budget")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-train-budget"))
    parser.add_argument("--seed", type=int, default=42, help="the bootstrap's seed")
    parser.add_argument("--set", action="append", default=[], help="a params override (all)")
    args = parser.parse_args()
    variants = [Variant("old loop", args.baseline.resolve())] if args.baseline else []
    if args.with_epochs:
        variants.append(Variant("epochs", REPO, ["train.max_steps=null"]))
    if args.max_steps is not None:
        variants.append(Variant("budget", REPO, [f"train.max_steps={args.max_steps}"]))
    variants += [named_variant(spec) for spec in args.variant]
    runs = [train_variant(v, args.processed.resolve(), args.workdir, args.set) for v in variants]
    students = {run["name"]: Path(run["model_dir"]) for run in runs}
    paired = paired_test_auc(args.processed, students, runs[-1]["name"], runs[0]["name"], args.seed)
    body = table(args.processed, args.set, runs, paired)
    print(body)
    print(f"written {write_result('train-budget', machine_header() + chr(10) * 2 + body)}")


if __name__ == "__main__":
    main()
