"""Ingestion fan-out: Prefect's task runners against the stage's own process pool.

Decodes the same folder with each ``tasks.data.ingestion`` decode map, alternating, inside one
Prefect flow run (on Prefect's temporary local server, as ``medtransfer run`` uses):

- ``pool``: the stage's ``ProcessPoolExecutor`` (``medtransfer ingest``, ``dvc repro``);
  the baseline;
- ``processes`` / ``threads`` / ``dask``: ``flows.fanout``'s ``decode-files`` tasks on
  Prefect's ``ProcessPoolTaskRunner``, ``ThreadPoolTaskRunner``, or ``prefect-dask``'s
  ``DaskTaskRunner`` with a local cluster started for the run (its start-up is counted,
  as the flow pays it on every run).

Two folders: the demo's synthetic default (params.yaml) and ``--n`` 512x512 16-bit files.
Prints medians over ``--repeats`` with the ratio to ``pool`` and writes
``benchmarks/results/fanout.md``.

Usage: ``python -m benchmarks.fanout [--n 1000] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from prefect import flow

from benchmarks.ingest import IMAGE_SIZE, generate
from benchmarks.report import machine_header, write_result
from flows.fanout import task_runner_decode_map
from tasks.config import Params, load_params
from tasks.data.ingestion import ingest_folder
from tasks.data.labels import read_label_source
from tasks.data.synthetic import SyntheticConfig
from tasks.data.synthetic import generate as generate_synthetic

VARIANTS = ("pool", "processes", "threads", "dask")


def time_variant(variant: str, folder: Path, params: Params) -> float:
    """Seconds to ingest ``folder`` (its labels.csv beside it) with one decode map."""
    labels = read_label_source(folder, str(folder / "labels.csv"))
    decode_map = None
    if variant != "pool":
        decode_map = task_runner_decode_map(
            params.with_overrides([f"orchestration.task_runner={variant}"])
        )
    start = time.perf_counter()
    ingest_folder(
        folder, labels, params.data, params.seed, "benchmark", progress=False, decode_map=decode_map
    )
    return time.perf_counter() - start


@flow(name="benchmark-fanout")
def measure(folders: dict[str, Path], base: Params, out: Path, repeats: int) -> dict:
    """Median seconds per (folder name, variant), variants alternating within each repeat."""
    seconds: dict[tuple[str, str], list[float]] = {}
    for name, folder in folders.items():
        params = base.with_overrides(
            [f"data.processed_dir={out / name}", f"reports_dir={out / 'reports'}"]
        )
        for repeat in range(repeats):
            for variant in VARIANTS:
                took = time_variant(variant, folder, params)
                seconds.setdefault((name, variant), []).append(took)
                print(f"{name} run {repeat + 1} {variant}: {took:.2f} s", flush=True)
    return {key: statistics.median(values) for key, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medtransfer-bench"))
    args = parser.parse_args()

    base = load_params(
        "params.yaml",
        [f"synthetic.output_dir={args.cache / 'fanout-default'}", f"data.image_size={IMAGE_SIZE}"],
    )
    default_folder, _ = generate_synthetic(SyntheticConfig.from_params(base))
    folders = {
        "synthetic default": default_folder,
        f"{args.n} x 512px": generate(args.cache, args.n),
    }
    counts = {name: sum(1 for p in f.rglob("*") if p.is_file()) for name, f in folders.items()}
    medians = measure(folders, base, args.cache / "fanout-out", args.repeats)

    lines = [
        "| folder | files | decode map | median s | files/s | vs pool |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name in folders:
        pool = medians[(name, "pool")]
        for variant in VARIANTS:
            took = medians[(name, variant)]
            lines.append(
                f"| {name} | {counts[name]} | {variant} | {took:.2f} | "
                f"{counts[name] / took:.1f} | {pool / took:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    workers = base.data.worker_count
    write_result(
        "fanout",
        f"{machine_header()}\n\nIngesting one folder with each decode map, {workers} workers, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} output; medians of {args.repeats} alternating runs in one "
        "Prefect flow run on the temporary local server. `vs pool` > 1 is faster than the "
        "stage's own process pool.\n\n" + table,
    )


if __name__ == "__main__":
    main()
