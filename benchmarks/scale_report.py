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
file-backed pages), after `tasks/data/dataset_writer.py` stopped writing through a memory map
and the flow's ingest began submitting chunks in a bounded window (`flows/fanout.py`).

Findings (files of 64 x 64 pixels, six transfer syntaxes, `data.image_size=64`, 2 workers):

- Memory, before: the ingesting process's RSS grew with the file count (pool: 257 MiB at
  10,000 files, 720 MiB at 100,000), the written memory map of images.npy; the flow's runners
  also kept every decoded chunk's future to the end. After: 122 MiB (1,000) and 259 MiB
  (100,000) of anonymous memory. What still grows is the manifest's per-file row (about 1.4 KiB
  a file), never the images: at 224 px a decoded image alone is 49 KiB. The threads runner
  went from 718 MiB RSS to 524 MiB anonymous at 10,000 files (Prefect's per-task-run
  bookkeeping is the rest; not measured at other counts).
- Speed: the stage's own process pool is the fastest way on one machine (85 to 170 files/s
  here); the Prefect runners pay for a task run per chunk of 32 files against a temporary
  server (threads 24 to 37 files/s; processes and the 2-worker Dask cluster 16 to 17, on the
  same 2 cores, so no gain is possible from more workers here). The 100,000-file pool run
  after the fix met a lighter load (21 -> 11) than the one before (26 -> 24): its 2x speed is
  the load, not the change.
- MLflow: with 1,000 runs, listing all of them takes 3.3 s on SQLite and 6.8 s through the
  PostgreSQL-backed server (HTTP and JSON for 1,000 runs); the UI's first page (100 runs,
  filtered and ordered by a metric) 0.35 s and 0.57 s. Nothing near mlflow/mlflow#2730's
  minutes at this size; the server's cost is per run returned, so page the searches.
- DVC and training memory: the two sections at the end (run 20:59-21:40 UTC, the later
  date in the header; the rows above are from 19:06 UTC's runs).
"""

DVC_NOTES = """\
`benchmarks/scale_dvc.py`: a git + DVC project per N whose one stage depends on `data/source`
(N hard-linked files of the generated set) as dvc.yaml's `ingest` depends on
`${data.source}`; its command only counts the files, so the times are DVC's own. Each command
is a fresh `dvc` process (about 2 s of imports under this load). n = 1 per cell except the
medians of 3; load average 11 to 20 throughout.

What grows: every `dvc status` walks the folder and looks each file up in DVC's state
database (inode, size, mtime -> hash): linear in the file count. A `dvc repro` of a changed
stage builds the dependency's tree about ten times (profiled at 10,000 files:
`dvc_data.hashfile.build._build_tree` called 10 times in one `dvc repro`), so adding one file
to the source costs several times a status. `--no-run-cache` saved about 15% (21 s against
25 s at 10,000 files, two runs each). No `dvc config` setting removes the per-file walk, and
a `.dvc` file cannot stand in for the folder (`dvc repro`: "DVC file 'data/source.dvc' cannot
be a dependency", tried). Fixed by changing what `ingest` depends on: images delivered as
archives (one per batch, so that DVC hashes a few large files: treeverse/dvc#7681's advice),
which ingest now reads (`tasks/data/archives.py`; the last section).

Growth: status 2 s (10,000 files), 11 s (30,000), 23 to 89 s (100,000): the 100,000-file
statuses ran while the load peaked near 20 (other benchmarks beside them), the status after one
added file, later, took 23 s and an unchanged repro 28 s. The first repro reads and hashes every
file (4 ms a file here); adding one file to 100,000 costs a 4-minute repro before ingest runs.
"""

ARCHIVE_NOTES = """\
`benchmarks/scale_dvc.py --layout archives folder` (2026-12-06, 23:31-23:55 UTC; the machine
and versions of the header, dvc 3.67.1, Python 3.11.7's zipfile; shared, load in the table,
every run `nice -n 10`): the same DVC project, its `data/source` the N files numbered below N of the generated set (both
labels), as the folder (hard links) and as ZIP shards of 1,000 files (deflated, one per
second-level folder number: `part-NNN.zip` holding `<label>/NNN/*.dcm`, what ingest reads as
that folder), side by side in one run. "One added" is one more file for the folder and one
more shard of 1,000 files for the archives. n = 1 per cell except the medians of 3.

DVC's cost follows the paths it hashes, not the bytes: at 100,000 files (713 MB as files,
611 MB as deflated shards) `dvc status` is 28 times faster as 100 shards (2.37 s against
65.76 s), the first repro 54 times (6.67 s against 358.46 s: hashing 611 MB in 100 files), a
repro after one more shard 37 times faster than after one more file (6.02 s against 223.38 s). At 10,000 files the
folder's status is already near DVC's start-up (0.88 s against 0.63 s); the first repro is
7 times faster (0.86 s against 6.22 s). The shards took 99 s to write at 100,000 files
(`fill_s` in the results, not in the table: deflating 713 MB under this load); hard links
50 s.
"""

ARCHIVE_INGEST_NOTES = """\
Ingest from the shards against the folder, 10,000 files, the stage's process pool (2
workers), alternating folder and archives (three pairs, 23:46-23:57 UTC): the first folder run
read files not yet in the page cache (82 files/s); the two later pairs give archives 0.99 and
1.30 times the folder's files/s. Reading the members in the parent and handing their bytes to
the workers costs nothing measurable against decoding; peak anonymous memory is the folder's
plus 5 to 9 MiB (the members read ahead: at most 128 MiB by design, here about 2 MiB, 8 chunks
of 32 members of 7 KB; and the archives' directories).

Then 100,000 files from the 100 shards (00:00 and 00:10 UTC), n = 1 each: the first run's
entries kept each member's `ZipInfo` (the listing held 76 MiB, measured with tracemalloc): 335
MiB peak; after, they keep its place in the directory (23 MiB): 280 MiB, against 258 MiB for the
folder at 100,000 (the first table, another load). What grows is per member (the entry, about
0.2 KiB) and the manifest row, as for a folder. Both runs gave the folder's dataset:
`images.npy`, `labels.npy`, `dataset.json` and `quarantine.csv` byte-identical to those of the
folder's 100,000-file run (19:02 UTC), the manifest's rows identical in every column that run
had (the grouping columns came later).
"""

TRAIN_NOTES = """\
`benchmarks/scale_train.py`: the first N rows of the 100,000-image processed set (64 x 64
pixels), the train stage's data path in a fresh process: `load_processed` (images.npy
memory-mapped), `tasks.training.strategies._datasets` as training builds them, then 20
shuffled training batches of 32 and 20 validation batches of 64. Peak anonymous RSS sampled
every 0.2 s, n = 1 each. Before: the training and validation sets were `images[train_idx]`
copies, so memory grew by one image per training image (4 KiB at 64 px; at 224 px 49 KiB,
3.3 GiB for 70,000 training images). After (`tasks.data.dataset.Rows`): rows of the memory
map, read per image: flat. What still grows is the labels, splits and manifest rows (about
0.3 KiB an image). Evaluation, the conformal and profile fits still load a split (val or
test, 15% each) into memory: not changed here.
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


def _dvc_rows(entries: list[dict]) -> list[str]:
    rows = ["| files in data.source | repro, first (hashes every file) s | status s (median of 3) | repro, unchanged s (median of 3) | status, one file added s | repro, one file added s | load before -> after |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for e in entries:
        rows.append(
            f"| {e['files']:,} | {e['repro_first_s']} | {e['status_s']} | "
            f"{e['repro_unchanged_s']} | {e['status_one_added_s']} | {e['repro_one_added_s']} | "
            f"{e['load_before'][0]} -> {e['load_after'][0]} |"
        )
    return rows


def _dvc_layout_rows(entries: list[dict]) -> list[str]:
    rows = ["| data.source | files | paths DVC hashes | repro, first s | status s (median of 3) | repro, unchanged s (median of 3) | status, one added s | repro, one added s | load before -> after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for e in entries:
        layout = "ZIP shards of 1,000" if e["layout"] == "archives" else "folder"
        rows.append(
            f"| {layout} | {e['files']:,} | {e['paths']:,} | {e['repro_first_s']} | "
            f"{e['status_s']} | {e['repro_unchanged_s']} | {e['status_one_added_s']} | "
            f"{e['repro_one_added_s']} | {e['load_before'][0]} -> {e['load_after'][0]} |"
        )
    return rows


def _archive_ingest_rows(entries: list[dict]) -> list[str]:
    rows = ["| data.source | runner | files | files/s | ingest s | peak anon MiB (ingesting process) | peak anon MiB (tree) | load before -> after |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for e in entries:
        layout = "ZIP shards of 1,000" if e.get("layout") == "archives" else "folder"
        rows.append(
            f"| {layout} | {e['runner']} | {e['n']:,} | {e['files_per_s']} | {e['ingest_s']} | "
            f"{e['peak_rss_mib']:.0f} | {e['peak_tree_rss_mib']:.0f} | "
            f"{e['load_before'][0]} -> {e['load_after'][0]} |"
        )
    return rows


def archives_section(entries: list[dict], since: int) -> list[str]:
    """The section on archives: the DVC rows with a ``layout`` and the ingest rows from line
    ``since`` of the results on (the side-by-side runs of folder and archives)."""
    dvc = [e for e in entries if e["bench"] == "dvc" and "layout" in e]
    ingest = [e for e in entries[since:] if e["bench"] == "ingest"]
    return ["## DVC and ingestion with archives", "", ARCHIVE_NOTES, *_dvc_layout_rows(dvc), "",
            ARCHIVE_INGEST_NOTES, *_archive_ingest_rows(ingest), ""]  # fmt: skip


def _train_rows(entries: list[dict]) -> list[str]:
    rows = ["| code | images in the set | training images | peak anon MiB | load before -> after |",
            "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for e in entries:
        code = {"before": "`images[train_idx]` copies", "after": "`Rows` of the memory map"}
        rows.append(
            f"| {code.get(e['label'], e['label'])} | {e['n']:,} | {e['train_images']:,} | "
            f"{e['peak_rss_mib']:.0f} | {e['load_before'][0]} -> {e['load_after'][0]} |"
        )
    return rows


def write_report(results: Path) -> Path:
    entries = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    since = next((i for i, e in enumerate(entries) if "layout" in e), len(entries))
    ingest = [e for e in entries[:since] if e["bench"] == "ingest"]  # the later: archives'
    mlflow = [e for e in entries if e["bench"] == "mlflow"]
    dvc = [e for e in entries if e["bench"] == "dvc" and "layout" not in e]
    train = [e for e in entries if e["bench"] == "train_rss"]
    body = "\n".join(
        [machine_header(), "", NOTES, "## Ingestion", "", *_ingest_rows(ingest), "",
         "## MLflow search", "", *_mlflow_rows(mlflow), "",
         "## DVC on a large data.source", "", DVC_NOTES, *_dvc_rows(dvc), "",
         "## Training memory against the set's size", "", TRAIN_NOTES, *_train_rows(train), ""]
        + (archives_section(entries, since) if since < len(entries) else [])
    )  # fmt: skip
    return write_result("scale", body)
