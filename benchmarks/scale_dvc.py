"""DVC on a large ``data.source``: the time of ``dvc status`` and ``dvc repro`` when the ingest
stage depends on a folder of N files (treeverse/dvc#7607 and #7681 report minutes with large
folders).

A throwaway git + DVC project per N, its ``data/source`` hard links to the N files numbered
below N of the generated set (``benchmarks.scale_data``), one stage shaped like medtransfer's ingest: it
depends on the folder, as dvc.yaml's ``ingest`` depends on ``${data.source}``, and its command
only counts the files (the decoding is measured by ``benchmarks.scale``; here only DVC's own
work is timed). Timed, each a fresh ``dvc`` process:

- ``repro (first)``: hashes every file (nothing in DVC's state database yet);
- ``status``, ``repro (unchanged)``: DVC's state database knows each file's hash by inode,
  size and mtime, so only a walk and the look-ups remain (median of ``--repeats``);
- ``status (one file added)``, ``repro (one file added)``: one new file, then its repro.

With ``--layout archives`` the same N files are delivered as ZIP shards of 1,000 (one per
second-level folder of the generated set, :func:`pack`), as ingestion reads them
(:mod:`tasks.data.archives`): DVC then hashes N / 1,000 large files instead of N small ones
(treeverse/dvc#7681's advice), and "one file added" is one more shard of 1,000.

Each configuration appends one JSON line to ``<work>/results.jsonl`` (bench ``dvc``, with its
``layout``), with the load average before and after. Usage::

    nice -n 10 python -m benchmarks.scale_dvc --work /work/scale-bench --n 10000 30000 100000
    nice -n 10 python -m benchmarks.scale_dvc --work /work/scale-bench --n 10000 100000 \
        --layout archives folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.scale import record, source_for

DVC = str(Path(sys.executable).parent / "dvc")
STAGE = """stages:
  ingest:
    cmd: find data/source -type f | wc -l > out/count.txt
    deps:
      - data/source
    outs:
      - out/count.txt
"""


FOLDER, ARCHIVES = "folder", "archives"
SHARD_FILES = 1000  # the generated set's files per second-level folder


def pack(base: Path, files: list[Path], shard: Path, prefix: str = "") -> None:
    """Write ``files`` (under ``base``) into the ZIP ``shard``, each under its path relative to
    ``base`` (after ``prefix``): extracted where it lies, the shard gives the folder back."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, prefix + path.relative_to(base).as_posix())


def shards(files: list[Path], base: Path) -> dict[str, list[Path]]:
    """``files`` grouped by their second-level folder (``<label>/<NNN>/``): one shard per
    ``NNN``, named ``part-NNN.zip``, 1,000 files each (both labels)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(f"part-{path.relative_to(base).parts[1]}.zip", []).append(path)
    return groups


def fill_source(source: Path, base: Path, files: list[Path], layout: str) -> float:
    """``source`` holding ``files``: hard links (``folder``) or ZIP shards; seconds taken."""
    started = time.perf_counter()
    if layout == ARCHIVES:
        for name, members in shards(files, base).items():
            pack(base, members, source / name)
    else:
        for path in files:
            target = source / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return round(time.perf_counter() - started, 2)


def add_one(source: Path, base: Path, layout: str) -> None:
    """One more file (``folder``), or one more shard of 1,000 files under ``extra/``."""
    if layout == ARCHIVES:
        first = sorted(p for p in base.rglob("*.dcm") if int(p.stem) < SHARD_FILES)
        pack(base, first, source / "part-extra.zip", prefix="extra/")
        return
    extra = next(source.rglob("*.dcm"))
    shutil.copy(extra, extra.with_name("added.dcm"))


def project(work: Path, n: int, layout: str = FOLDER) -> tuple[Path, float]:
    """A fresh git + DVC project whose ``data/source`` holds the first ``n`` files (hard
    links, or ZIP shards of 1,000), and the seconds the source took to fill."""
    root = work / f"dvc-{layout}-{n}"
    shutil.rmtree(root, ignore_errors=True)
    source = root / "data" / "source"
    base = source_for(work, 100_000)  # the generated set's DICOM folder, reused
    # Files numbered below n (both labels), so that a shard is one whole second-level number.
    files = sorted(p for p in base.rglob("*.dcm") if int(p.stem) < n)
    fill_s = fill_source(source, base, files, layout)
    (root / "out").mkdir()
    (root / "dvc.yaml").write_text(STAGE)
    (root / ".gitignore").write_text("/data/\n")
    for command in (["git", "init", "-q"], [DVC, "init", "-q"],
                    [DVC, "config", "core.analytics", "false"]):  # fmt: skip
        subprocess.run(command, cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project", "--no-gpg-sign"], cwd=root, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})  # fmt: skip
    return root, fill_s


def timed(root: Path, *args: str) -> float:
    """Seconds one ``dvc`` command takes in ``root`` (it must succeed)."""
    start = time.perf_counter()
    subprocess.run([DVC, *args], cwd=root, check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def bench(work: Path, n: int, repeats: int, layout: str = FOLDER) -> None:
    """Time the DVC commands on an ``n``-file source laid out as ``layout`` and record one
    result line."""
    root, fill_s = project(work, n, layout)
    paths = sum(1 for p in (root / "data" / "source").rglob("*") if p.is_file())
    load_before = [round(x, 2) for x in os.getloadavg()]
    first = timed(root, "repro")
    status = [timed(root, "status") for _ in range(repeats)]
    unchanged = [timed(root, "repro") for _ in range(repeats)]
    add_one(root / "data" / "source", source_for(work, 100_000), layout)
    changed_status = timed(root, "status")
    changed_repro = timed(root, "repro")
    record(work, {
        "bench": "dvc", "files": n, "layout": layout, "paths": paths, "fill_s": fill_s,
        "repro_first_s": first,
        "status_s": statistics.median(status), "repro_unchanged_s": statistics.median(unchanged),
        "status_one_added_s": changed_status, "repro_one_added_s": changed_repro,
        "repeats": repeats, "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    })  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/work/scale-bench"))
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", nargs="+", choices=(FOLDER, ARCHIVES), default=[FOLDER])
    args = parser.parse_args(argv)
    for n in args.n:
        for layout in args.layout:  # side by side: each N in every layout before the next N
            bench(args.work, n, args.repeats, layout)


if __name__ == "__main__":
    main()
