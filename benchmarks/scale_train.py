"""Training memory against the size of the processed set: peak anonymous RSS of the train
stage's data path (the memory-mapped ``images.npy``, the training and validation datasets
that :mod:`tasks.training.strategies` builds, and batches through a DataLoader as the loop
draws them) for processed sets of N images.

The sets are the first N rows of the 100,000-image set that ``benchmarks.scale ingest``
wrote (64 x 64 pixels), so no ingest runs here. The network's own memory does not depend on
N and its compute would dominate on a 2-core machine, so the child runs the data path only:
``_datasets`` as training calls it, then ``--batches`` shuffled training batches and as many
validation batches. Memory is sampled every 0.2 s (``benchmarks.scale.sampled``, anonymous
memory: the memory map's page cache is not the process's to hold).

Usage (after ``benchmarks.scale ingest --n 100000 --runner pool``)::

    nice -n 10 python -m benchmarks.scale_train --work /work/scale-bench --n 5000 20000 50000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.scale import record, sampled

REPO = Path(__file__).resolve().parents[1]
FULL_SET = "out-pool-100000/processed"


def processed_set(work: Path, n: int) -> Path:
    """The first ``n`` rows of the 100,000-image processed set, as a processed folder."""
    import pandas as pd

    source, out = work / FULL_SET, work / "train-sets" / f"processed-{n}"
    if (out / "dataset.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    images = np.load(source / "images.npy", mmap_mode="r")
    copy = np.lib.format.open_memmap(out / "images.npy", "w+", images.dtype, (n, *images.shape[1:]))
    for first in range(0, n, 4096):
        copy[first : first + 4096] = images[first : min(first + 4096, n)]
    copy.flush()
    del copy
    np.save(out / "labels.npy", np.load(source / "labels.npy")[:n])
    pd.read_csv(source / "manifest.csv", keep_default_na=False).head(n).to_csv(
        out / "manifest.csv", index=False
    )
    info = json.loads((source / "dataset.json").read_text()) | {"images": n}
    (out / "dataset.json").write_text(json.dumps(info))  # last: a folder with it is complete
    return out


def child(processed: Path, batches: int) -> None:
    """The data path of training on ``processed``; prints one JSON line."""
    from torch.utils.data import DataLoader

    from tasks.config import load_params
    from tasks.data.dataset import load_processed
    from tasks.training.strategies import _datasets

    started = time.perf_counter()
    config = load_params(REPO / "params.yaml").train
    dataset = load_processed(processed)
    train_idx = dataset.indices("train")
    train_set, val_set = _datasets(config, dataset, train_idx)
    drawn = 0
    for loader in (DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, 64)):
        for index, (images, _) in enumerate(loader):
            drawn += len(images)
            if index + 1 == batches:
                break
    print(json.dumps({"train_images": len(train_idx), "val_images": len(val_set),
                      "drawn": drawn, "data_path_s": round(time.perf_counter() - started, 2)}))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/work/scale-bench"))
    parser.add_argument("--n", type=int, nargs="+", default=[5_000, 20_000, 50_000])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--label", default="", help="recorded with each result, e.g. before")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.batches)
        return
    for n in args.n:
        folder = processed_set(args.work, n)
        command = [sys.executable, "-m", "benchmarks.scale_train", "--child", str(folder),
                   "--batches", str(args.batches)]  # fmt: skip
        result = sampled(command)
        record(args.work, {"bench": "train_rss", "n": n, "label": args.label, **result})


if __name__ == "__main__":
    main()
