"""``train.strategy: auto`` + ``train.teacher: auto`` against the exhaustive search: a measurement.

Every run goes through the product's own stages, in one process, exactly as ``medtransfer
train``, ``evaluate`` and ``robustness`` run them (:func:`tasks.stages.train.run_train`,
:func:`tasks.stages.evaluate.run_evaluate`, :func:`tasks.stages.robustness.run_robustness`),
each in its own folder (student, checkpoints, reports) against one MLflow store per data set:

1. **auto**: ``train.teacher=auto train.strategy=auto``: the train stage runs the rule
   (evidence, candidates, pilots by successive halving within ``train.auto_budget_minutes``,
   the finalists' inherited exposure), then trains the chosen student; evaluate and
   robustness judge it;
2. **exhaustive**: every bundled teacher x ``linear_probe``, ``partial`` 1/3/5/8 blocks,
   ``full`` and ``lp_ft``, each trained, evaluated and judged the same way.

Each run's test AUC with its 95% patient-bootstrap interval comes from the metrics report;
whether it passes comes from the robustness report's verdict (every configured gate, each
figure with its interval). One JSON line per finished run goes to
``<workdir>/<data>/runs.jsonl``: a crash loses nothing, and a rerun skips what is there.
``--render`` writes ``benchmarks/results/auto-strategy-exhaustive.md`` from those files
(:mod:`benchmarks.auto_strategy_report`).

Usage: ``nice -n 10 python -m benchmarks.auto_strategy --data /path/breastmnist.npz --size 32
--epochs 6`` (repeat per data set; ``--only auto`` or ``--only lite0:partial:3`` for one run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from tasks.config import Params, load_params
from tasks.stages.evaluate import run_evaluate
from tasks.stages.ingest import run_ingest
from tasks.stages.robustness import run_robustness
from tasks.stages.train import run_train

REPO = Path(__file__).resolve().parent.parent
TEACHERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
DEPTHS = (("linear_probe", 0), *(("partial", k) for k in (1, 3, 5, 8)), ("full", 0), ("lp_ft", 0))
# The robustness stage measures what the gates read and nothing they do not: the gates' two
# budgets (teacher-transfer 1/255, universal 2/255; the white-box and Square gates are off),
# no reference probe (a plot line, not a gate). Each attack is seeded per budget, so a gate's
# figure is the same as in the full sweep (checked on one student: identical verdict figures).
GATE_ROBUSTNESS = (
    "robustness.epsilons_255=[1,2]",
    "robustness.reference_probe=false",
    "robustness.square_max_samples=0",
)


def run_keys() -> list[tuple[str, str, int]]:
    """auto first, then the exhaustive grid, (teacher, strategy, unfreeze_blocks), strategy by
    strategy (each over the three teachers), so that a search cut short covers every teacher."""
    grid = [(t, s, k) for s, k in DEPTHS for t in TEACHERS]
    return [("auto", "auto", 3), *grid]


def key_label(teacher: str, strategy: str, blocks: int) -> str:
    """``auto`` or ``lite0 partial/3``."""
    if teacher == "auto":
        return "auto"
    depth = f"/{blocks}" if strategy == "partial" else ""
    return f"{teacher.removeprefix('efficientnet-')} {strategy}{depth}"


def data_name(source: str) -> str:
    """The data set's short name: ``synthetic`` or the ``.npz``'s stem."""
    return "synthetic" if source == "synthetic" else Path(source).stem


def prepare(workdir: Path, source: str, args: argparse.Namespace, shard: str = "") -> Params:
    """The data set's parameters (the shipped params.yaml with the benchmark's settings), its
    dataset ingested once, and its MLflow store set through the environment as a user would."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.processed_dir={workdir / 'processed'}",
        f"data.image_size={args.size}",
        f"train.epochs={args.epochs}",
        *GATE_ROBUSTNESS,
        *args.set,
    ]
    if source == "synthetic":
        overrides += [
            "data.source=synthetic",
            "data.labels_csv=null",
            f"synthetic.output_dir={workdir / 'synthetic'}",
        ]
    else:
        overrides += [f"data.source={source}"]
    params = load_params(REPO / "params.yaml", overrides)
    # one store per process: SQLite takes one writer at a time
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / f'mlflow{shard}.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(workdir / f"mlartifacts{shard}")
    if not (workdir / "processed" / "dataset.json").is_file():
        run_ingest(params.with_overrides([f"reports_dir={workdir / 'ingest-reports'}"]), False)
    return params


def run_one(base: Params, folder: Path, teacher: str, strategy: str, blocks: int) -> dict:
    """Train, evaluate and judge one configuration in ``folder`` (emptied first); returns its
    JSON line: stage times (s), the test AUC with its interval, the verdict with every gate's
    figure, and auto's decision."""
    shutil.rmtree(folder, ignore_errors=True)
    params = base.with_overrides(
        [
            f"train.teacher={teacher}",
            f"train.strategy={strategy}",
            f"train.unfreeze_blocks={blocks}",
            f"train.model_dir={folder / 'student'}",
            f"train.checkpoint_dir={folder / 'checkpoints'}",
            f"reports_dir={folder / 'reports'}",
        ]
    )
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    stages = (
        ("train", lambda: run_train(params, progress=False)),
        ("evaluate", lambda: run_evaluate(params)),
        ("robustness", lambda: run_robustness(params, progress=False)),
    )
    reports = {}
    for name, stage in stages:
        wall, used = time.perf_counter(), time.process_time()
        reports[name] = stage()
        times[name] = time.perf_counter() - wall
        cpu[name] = time.process_time() - used  # the process's CPU: fairer on a busy machine
    trained, metrics, robustness = reports["train"], reports["evaluate"], reports["robustness"]
    test = metrics["test"]
    auto = trained.get("auto") or {}
    return {
        "label": key_label(teacher, strategy, blocks),
        "teacher": auto.get("teacher", teacher),
        "strategy": trained["strategy"],
        "unfreeze_blocks": auto.get("unfreeze_blocks", blocks),
        "test_auc": test["auc"],
        "test_auc_ci95": [test["ci95"]["auc"]["low"], test["ci95"]["auc"]["high"]],
        "n_test": test["n_images"],
        "epochs_run": trained.get("epochs_run"),
        "best_epoch": trained.get("best_epoch"),
        "verdict": robustness["verdict"],
        "seconds": times,
        "cpu_seconds": cpu,
        "auto": {k: v for k, v in auto.items() if k != "evidence"} if auto else None,
    }


def done_labels(jsonl: Path) -> set[str]:
    """Labels of the runs already recorded in ``jsonl``."""
    if not jsonl.is_file():
        return set()
    return {json.loads(line)["label"] for line in jsonl.read_text().splitlines() if line}


def claim(workdir: Path, label: str) -> bool:
    """Take ``label`` for this process (``--claim``: processes share the grid as they come
    free); False when another process took it first."""
    (workdir / "claims").mkdir(exist_ok=True)
    try:
        (workdir / "claims" / label.replace(" ", "_").replace("/", "-")).mkdir()
    except FileExistsError:
        return False
    return True


def run_dataset(source: str, args: argparse.Namespace) -> None:
    """Every run of one data set not yet in its ``runs.jsonl``, auto first."""
    workdir = args.workdir / data_name(source)
    index, count = (int(n) for n in args.shard.split("/"))
    # one MLflow store per process: static shards by index, claiming processes by PID
    store = f"-{index}" if count > 1 else (f"-p{os.getpid()}" if args.claim else "")
    base = prepare(workdir, source, args, store)
    jsonl = workdir / "runs.jsonl"
    keys = list(enumerate(run_keys()))
    for position, (teacher, strategy, blocks) in reversed(keys) if args.reverse else keys:
        label = key_label(teacher, strategy, blocks)
        if label in done_labels(jsonl) or (args.only and label not in args.only):
            continue
        if position % count != index:  # another process's run
            continue
        if args.claim and not claim(workdir, label):  # another process has it
            continue
        folder = workdir / "runs" / label.replace(" ", "_").replace("/", "-")
        row = {"data": data_name(source), "image_size": args.size, "epochs": args.epochs}
        row |= run_one(base, folder, teacher, strategy, blocks)
        with jsonl.open("a") as out:
            out.write(json.dumps(row, default=str) + "\n")
        print(
            f"{row['data']} {label}: test AUC {row['test_auc']:.3f} "
            f"[{row['test_auc_ci95'][0]:.3f}, {row['test_auc_ci95'][1]:.3f}], "
            f"{'PASS' if row['verdict']['passed'] else 'FAIL'}, "
            f"{sum(row['seconds'].values()):.0f} s wall, {sum(row['cpu_seconds'].values()):.0f} s CPU "
            f"{ {k: round(v) for k, v in row['cpu_seconds'].items()} }",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mt-auto-bench"))
    parser.add_argument("--data", nargs="+", default=["synthetic"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], help="another params override")
    parser.add_argument("--only", nargs="+", default=None, help="run only these labels")
    parser.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th run")
    parser.add_argument("--claim", action="store_true", help="take runs as they come free")
    parser.add_argument("--reverse", action="store_true", help="the grid from its end")
    parser.add_argument("--render", action="store_true", help="write the results file only")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended (--render)")
    args = parser.parse_args()
    if args.render:
        from benchmarks.auto_strategy_report import render

        render(args.workdir, args.notes)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for source in args.data:
        run_dataset(source, args)


if __name__ == "__main__":
    main()
