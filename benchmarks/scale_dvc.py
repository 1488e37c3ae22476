"""DVC on a large ``data.source``: the time of ``dvc status`` and ``dvc repro`` when the ingest
stage depends on a folder of N files (treeverse/dvc#7607 and #7681 report minutes with large
folders).

A throwaway git + DVC project per N, its ``data/source`` hard links to the first N files of the
generated set (``benchmarks.scale_data``), one stage shaped like medtransfer's ingest: it
depends on the folder, as dvc.yaml's ``ingest`` depends on ``${data.source}``, and its command
only counts the files (the decoding is measured by ``benchmarks.scale``; here only DVC's own
work is timed). Timed, each a fresh ``dvc`` process:

- ``repro (first)``: hashes every file (nothing in DVC's state database yet);
- ``status``, ``repro (unchanged)``: DVC's state database knows each file's hash by inode,
  size and mtime, so only a walk and the look-ups remain (median of ``--repeats``);
- ``status (one file added)``, ``repro (one file added)``: one new file, then its repro.

Each configuration appends one JSON line to ``<work>/results.jsonl`` (bench ``dvc``), with the
load average before and after. Usage::

    nice -n 10 python -m benchmarks.scale_dvc --work /work/scale-bench --n 10000 30000 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
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


def project(work: Path, n: int) -> Path:
    """A fresh git + DVC project whose ``data/source`` hard-links the first ``n`` files."""
    root = work / f"dvc-{n}"
    shutil.rmtree(root, ignore_errors=True)
    source = root / "data" / "source"
    base = source_for(work, 100_000)  # the generated set's DICOM folder, reused
    files = sorted(base.rglob("*.dcm"))[:n]
    for path in files:
        target = source / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
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
    return root


def timed(root: Path, *args: str) -> float:
    """Seconds one ``dvc`` command takes in ``root`` (it must succeed)."""
    start = time.perf_counter()
    subprocess.run([DVC, *args], cwd=root, check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def bench(work: Path, n: int, repeats: int) -> None:
    """Time the DVC commands on an ``n``-file source and record one result line."""
    root = project(work, n)
    load_before = [round(x, 2) for x in os.getloadavg()]
    first = timed(root, "repro")
    status = [timed(root, "status") for _ in range(repeats)]
    unchanged = [timed(root, "repro") for _ in range(repeats)]
    extra = next((root / "data" / "source").rglob("*.dcm"))
    shutil.copy(extra, extra.with_name("added.dcm"))
    changed_status = timed(root, "status")
    changed_repro = timed(root, "repro")
    record(work, {
        "bench": "dvc", "files": n, "repro_first_s": first,
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
    args = parser.parse_args(argv)
    for n in args.n:
        bench(args.work, n, args.repeats)


if __name__ == "__main__":
    main()
