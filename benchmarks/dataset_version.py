"""The dataset version: DVC's own builder (``dvc_data``, used by ``dataset_version``) against
the hand-written copy of DVC's ``.dir`` hash that it replaced.

Writes a processed-dataset-like folder (``images.npy`` of N x 128 x 128 uint8 random pixels,
labels, a manifest and ``dataset.json``) once, checks that both give the same hash, then times
them alternating, ``--repeats`` times each, and prints the medians and their ratio. The table
goes to ``benchmarks/results/dataset_version.md``.

Usage: ``python -m benchmarks.dataset_version [--n 20000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import machine_header, write_result
from tasks.data.dataset import dataset_version


def hand_written(root: Path) -> str:
    """The replaced copy: md5 of the JSON list of ``{"md5", "relpath"}`` entries + ``.dir``."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
        entries.append({"md5": digest.hexdigest(), "relpath": path.relative_to(root).as_posix()})
    payload = json.dumps(entries, sort_keys=True, separators=(", ", ": ")).encode()
    return hashlib.md5(payload).hexdigest() + ".dir"


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.integers(0, 256, (n, 128, 128), dtype=np.uint8))
    np.save(root / "labels.npy", rng.integers(0, 2, n))
    (root / "manifest.csv").write_text("".join(f"{i},x\n" for i in range(n)))
    (root / "dataset.json").write_text(json.dumps({"n": n}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_folder(root, args.n)
        size_mb = sum(p.stat().st_size for p in root.iterdir()) / 1e6
        assert dataset_version(root) == hand_written(root)
        times: dict[str, list[float]] = {"dvc_data build": [], "hand-written": []}
        for _ in range(args.repeats):
            for name, fn in (("dvc_data build", dataset_version), ("hand-written", hand_written)):
                start = time.perf_counter()
                fn(root)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        "| hash | median s | min s | max s |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {medians[name]:.3f} | {min(v):.3f} | {max(v):.3f} |"
            for name, v in times.items()
        ),
    ]
    ratio = medians["dvc_data build"] / medians["hand-written"]
    body = (
        f"{machine_header()}\n"
        f"Folder: {args.n} images of 128x128 uint8 ({size_mb:.0f} MB, 4 files); "
        f"{args.repeats} alternating runs each, page cache warm; both give the same hash. The 2 cores were shared with other jobs: read the ratio, not the seconds.\n\n"
        + "\n".join(rows)
        + f"\n\nRatio dvc_data / hand-written (medians): {ratio:.2f}\n"
    )
    print(body)
    write_result("dataset_version", body)


if __name__ == "__main__":
    main()
