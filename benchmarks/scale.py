"""Hospital scale, measured: ingestion of up to 100,000 small DICOM files per task runner, peak
memory against file count, and MLflow search with 1,000 runs on SQLite against the
PostgreSQL-backed server. (Training memory against the set's size: ``benchmarks.scale_train``;
DVC on a large ``data.source``: ``benchmarks.scale_dvc``; both append to the same file.)

Each measurement runs in a fresh child process whose process tree (and, for Dask, the cluster's
worker processes) is sampled for resident memory every 0.2 s; each appends one JSON line to
``<work>/results.jsonl`` with the machine's load average before and after (the machine is
shared), and ``report`` turns that file into ``benchmarks/results/scale.md``.

Usage (nice: the machine is shared)::

    nice -n 10 python -m benchmarks.scale_data /work/scale-bench/files100k --n 100000
    nice -n 10 python -m benchmarks.scale ingest --work /work/scale-bench --n 100000 --runner pool
    nice -n 10 python -m benchmarks.scale ingest --n 10000 --runner pool --layout archives
    nice -n 10 python -m benchmarks.scale mlflow --work /work/scale-bench --runs 1000
    python -m benchmarks.scale report --work /work/scale-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.scale_data import generate

IMAGE_SIZE = 64
RUNNERS = ("pool", "threads", "processes", "dask")
SAMPLE_S = 0.2


def tree_rss(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS of the first process, RSS of every listed process and their children), bytes.
    Anonymous memory only (RSS less file-backed pages): a memory-mapped dataset's pages are
    the page cache's to drop, not memory the process holds."""
    import psutil

    first, total = 0, 0
    for index, pid in enumerate(pids):
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                info = proc.memory_info()
                rss = info.rss - info.shared
            except psutil.NoSuchProcess:
                continue
            total += rss
            if index == 0 and proc is root:
                first = rss
    return first, total


def sampled(command: list[str], extra_pids: Sequence[int] = (), timeout: float | None = None,
            env: dict | None = None) -> dict:  # fmt: skip
    """Run ``command``; its exit status, wall seconds, the last JSON line it printed and the
    peak RSS of it alone and of its tree plus ``extra_pids`` (MiB). Killed after ``timeout``."""
    load_before = os.getloadavg()
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak_self = peak_tree = 0
    while process.poll() is None:
        own, total = tree_rss([process.pid, *extra_pids])
        peak_self, peak_tree = max(peak_self, own), max(peak_tree, total)
        if timeout is not None and time.monotonic() - started > timeout:
            process.kill()
        time.sleep(SAMPLE_S)
    out = process.stdout.read() if process.stdout else ""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {
        "status": process.returncode,
        "wall_s": round(time.monotonic() - started, 2),
        "peak_rss_mib": round(peak_self / 2**20, 1),
        "peak_tree_rss_mib": round(peak_tree / 2**20, 1),
        "rss_kind": "anonymous",
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        **(json.loads(lines[-1]) if lines else {}),
    }


def record(work: Path, entry: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "results.jsonl", "a") as out:
        out.write(json.dumps(entry) + "\n")
    print(json.dumps(entry), flush=True)


def source_for(work: Path, n: int) -> Path:
    return generate(work / f"files{n}", n)


def ingest_overrides(source: Path, out: Path, runner: str, address: str | None) -> list[str]:
    extra = [f"orchestration.task_runner={runner}"] if runner != "pool" else []
    if address:
        extra.append(f"orchestration.dask_address={address}")
    return [
        f"data.source={source}", "data.labels_csv=null", f"data.image_size={IMAGE_SIZE}",
        f"data.processed_dir={out / 'processed'}", f"reports_dir={out / 'reports'}",
        "data.workers=2", *extra,
    ]  # fmt: skip


def child_ingest(overrides: list[str], runner: str) -> None:
    """In the child: ingest with the plain stage (``pool``) or the flow's ingest task on a
    Prefect task runner; prints ``{"files", "ingest_s"}`` as its last line."""
    import flows  # noqa: F401  (process defaults first, as the medtransfer command does)
    from tasks.config import load_params

    params = load_params("params.yaml", overrides)
    started = time.monotonic()
    if runner == "pool":
        from tasks.stages.ingest import run_ingest

        report = run_ingest(params, progress=False).to_report()
    else:
        from prefect import flow

        from flows import pipeline
        from flows.fanout import flow_task_runner

        @flow(name="scale-ingest")
        def ingest_only(params):
            return pipeline.ingest(params)

        report = ingest_only.with_options(task_runner=flow_task_runner(params))(params)
    took = time.monotonic() - started
    print(json.dumps({"files": report["files_seen"], "ingested": report["ingested"],
                      "ingest_s": round(took, 2), "files_per_s": round(report["files_seen"] / took, 1)}))  # fmt: skip


def archives_for(work: Path, n: int) -> Path:
    """The ``n``-file generated set as ZIP shards of 1,000 files (``benchmarks.scale_dvc``'s
    layout), written once into ``<work>/shards<n>`` (a ``done`` file marks it complete)."""
    from benchmarks.scale_dvc import fill_source

    folder = work / f"shards{n}"
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        base = source_for(work, n)
        fill_source(folder / "source", base, sorted(base.rglob("*.dcm")), "archives")
        (folder / "done").write_text("")
    return folder / "source"


def bench_ingest(work: Path, n: int, runner: str, layout: str = "folder") -> None:
    """Ingest the ``n``-file set (as a folder, or as ZIP shards) with ``runner``, sampling
    memory; one result line."""
    source = archives_for(work, n) if layout == "archives" else source_for(work, n)
    out = work / f"out-{runner}-{n}{'-archives' if layout == 'archives' else ''}"
    shutil.rmtree(out, ignore_errors=True)
    with _cluster_if(runner, work) as cluster:
        address = cluster.address if cluster else None
        extra = [cluster.scheduler.pid, *(w.pid for w in cluster.workers)] if cluster else []
        overrides = ingest_overrides(source, out, runner, address)
        command = [sys.executable, "-m", "benchmarks.scale", "_ingest", "--runner", runner,
                   *(f"-S{o}" for o in overrides)]  # fmt: skip
        result = sampled(command, extra, env=_child_env(work))
    layout_key = {"layout": layout} if layout != "folder" else {}
    record(work, {"bench": "ingest", "runner": runner, "n": n, **layout_key, **result})
    shutil.rmtree(out / "processed", ignore_errors=True) if n < 100_000 else None


def _child_env(work: Path) -> dict:
    """No Prefect server of ours: the flow child starts its temporary one, in ``work``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    env["MEDTRANSFER_PATIENT_SALT"] = "benchmark-salt"
    return env


def _cluster_if(runner: str, work: Path):
    import contextlib

    if runner != "dask":
        return contextlib.nullcontext(None)
    from tests.scale.services import dask_cluster

    (work / "dask").mkdir(parents=True, exist_ok=True)
    return dask_cluster(work / "dask")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["ingest", "mlflow", "report", "_ingest"])
    parser.add_argument("--work", type=Path, default=Path("/work/scale-bench"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--runner", choices=RUNNERS, default="pool")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--layout", choices=["folder", "archives"], default="folder")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    actions: dict[str, Callable[[], None]] = {
        "_ingest": lambda: child_ingest(args.overrides, args.runner),
        "ingest": lambda: bench_ingest(args.work, args.n, args.runner, args.layout),
        "mlflow": lambda: _mlflow(args.work, args.runs),
        "report": lambda: _report(args.work),
    }
    actions[args.what]()


def _mlflow(work: Path, runs: int) -> None:
    from benchmarks.scale_mlflow import bench_mlflow

    for entry in bench_mlflow(work, runs):
        record(work, entry)


def _report(work: Path) -> None:
    from benchmarks.scale_report import write_report

    print(write_report(work / "results.jsonl"))


if __name__ == "__main__":
    main()
