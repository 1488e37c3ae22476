"""``benchmarks/results/scale.md`` from the JSON lines ``benchmarks/scale.py`` appended."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import machine_header, write_result

NOTES = """\
The machine is shared by eight people on 2 cores: every run is `nice -n 10` and its load
average (1, 5, 15 min) before and after is in the table; files/s are single runs under that
load (n = 1 each), so read the ratios loosely. Peak RSS is sampled every 0.2 s.
"RSS" rows measured before the memory fix count every resident page, the memory-mapped
images.npy being written included; "anon" rows count anonymous memory only (RSS less
file-backed pages), after `tasks/data/dataset_writer.py` stopped writing through a memory map.
"""


def _ingest_rows(entries: list[dict]) -> list[str]:
    rows = ["| runner | files | files/s | ingest s | peak MiB (ingesting process) | peak MiB (tree, + Dask workers) | memory counted | load before -> after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for e in entries:
        kind = "anon" if e.get("rss_kind") == "anonymous" else "RSS (before fix)"
        rows.append(
            f"| {e['runner']} | {e['n']:,} | {e.get('files_per_s', 'failed')} | {e.get('ingest_s', '')} | "
            f"{e['peak_rss_mib']:.0f} | {e['peak_tree_rss_mib']:.0f} | {kind} | "
            f"{e['load_before'][0]} -> {e['load_after'][0]} |"
        )
    return rows


def _mlflow_rows(entries: list[dict]) -> list[str]:
    rows = ["| store | runs | fill s | search all runs s (median of 5) | UI first page s (median of 5) |",
            "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for e in entries:
        rows.append(
            f"| {e['store']} | {e['runs']:,} | {e['fill_s']} | {e['search_all_s']} | "
            f"{e['search_ui_page_s']} |"
        )
    return rows


def write_report(results: Path) -> Path:
    entries = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ingest = [e for e in entries if e["bench"] == "ingest"]
    mlflow = [e for e in entries if e["bench"] == "mlflow"]
    body = "\n".join(
        [machine_header(), "", NOTES, "## Ingestion", "", *_ingest_rows(ingest), "",
         "## MLflow search", "", *_mlflow_rows(mlflow), ""]
    )  # fmt: skip
    return write_result("scale", body)
