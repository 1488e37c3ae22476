"""The training loop's speed, old against new, side by side in one process.

The default student (``train`` in params.yaml: efficientnet-lite0, ``full``, batch 32) on a
processed 128 px set, three variants of one training step (loader, forward, backward,
optimizer step) timed in interleaved rounds (in the order ABC, then CBA, ...), each its own copy of the same initial network:

- ``old``: what the loop did before: the per-image MONAI augmentation
  (:func:`tasks.model.transforms.train_transform`) in the Dataset, default memory format;
- ``old + channels_last``: the same, the network and batches in channels_last;
- ``new``: plain pixels from the Dataset, :class:`tasks.training.augment.BatchAugment` on the
  whole batch, channels_last (what :func:`tasks.training.strategies.fit_student` now runs).

Also timed per round: validation over ``--val-images`` images in both memory formats. Prints
the medians, the ratios to ``old`` and an epoch's estimate (steps per epoch x median step +
validation scaled to the validation split), and writes ``benchmarks/results/train-speed.md``.

The timing set: ``--make-set OUT.npz`` writes chest scenes of the built-in generator
(:func:`tasks.data.synthetic.chest_scene`) with PneumoniaMNIST's split sizes (4,708 / 524 /
624, 74 % positive) at 128 px; ingest it (``medtransfer ingest -S data.source=OUT.npz -S
data.processed_dir=DIR``) and pass ``DIR``.

Usage: ``python -m benchmarks.train_speed DIR [--rounds 3] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.dataset import Rows, load_processed
from tasks.data.synthetic import chest_scene
from tasks.model.student import param_groups
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.training.augment import BatchAugment
from tasks.training.loop import class_weights
from tasks.training.strategies import build_model
from tasks.training.validation import validation_metrics

SPLITS = {"train": 4708, "val": 524, "test": 624}  # PneumoniaMNIST's
POSITIVE = 0.74
VARIANTS = ("old", "old + channels_last", "new")


def make_set(path: Path, size: int = 128, seed: int = 23) -> Path:
    """Write the timing set: chest scenes, label 1 with a faint opacity (contrast 0.35)."""
    rng = np.random.default_rng([seed, 23])
    arrays = {}
    for split, n in SPLITS.items():
        labels = (rng.random(n) < POSITIVE).astype(np.uint8)
        images = [chest_scene(size, rng, 0.35 if label else None) for label in labels]
        arrays[f"{split}_images"] = np.rint(np.stack(images) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


class Variant:
    """One way of training: its own network copy, optimizer and batch source."""

    def __init__(self, name: str, model: nn.Module, dataset, config, criterion) -> None:
        self.name, self.model, self.criterion = name, model, criterion
        self.channels_last = name != "old"
        augment = config.augment
        idx, size = dataset.indices("train"), dataset.image_size
        rows, labels = Rows(dataset.images, idx), dataset.labels[idx]
        if name == "new":
            train_set = ImageDataset(rows, labels, to_tensor_transform(dataset.channels))
            self.augment: Callable | None = BatchAugment(augment, size, dataset.channels)
        else:
            train_set = ImageDataset(rows, labels, train_transform(augment, size, dataset.channels))
            self.augment = None
        generator = torch.Generator().manual_seed(0)
        self.loader = DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
            generator=generator,
        )  # fmt: skip
        self.batches = iter(self.loader)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, config.lr, config.backbone_lr_factor),
            lr=config.lr, weight_decay=config.weight_decay,
        )  # fmt: skip

    def step(self) -> float:
        """One timed training step (batch drawn, augmented, forward, backward, update)."""
        start = time.perf_counter()
        images, labels = next(self.batches)
        if self.augment is not None:
            images = self.augment(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.model.train()
        loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def timed_validation(model: nn.Module, loader: DataLoader, channels_last: bool) -> float:
    start = time.perf_counter()
    validation_metrics(model, loader, torch.device("cpu"), False, channels_last)
    return time.perf_counter() - start


def measure(processed: Path, rounds: int, steps: int, val_images: int) -> dict:
    """Interleaved rounds of every variant; returns the per-step and validation times."""
    config = load_params(Path(__file__).resolve().parents[1] / "params.yaml").train
    dataset = load_processed(processed)
    torch.manual_seed(0)
    base = build_model(config, config.strategy, len(dataset.classes), dataset.channels)
    train_labels = dataset.labels[dataset.indices("train")]
    criterion = nn.CrossEntropyLoss(weight=class_weights(train_labels, 2, config.class_weighting))
    variants = [Variant(n, copy.deepcopy(base), dataset, config, criterion) for n in VARIANTS]
    for variant in variants:  # warm-up: first-call allocations and oneDNN primitive caches
        variant.step()
    val_rows, val_labels = dataset.rows("val")
    keep = np.arange(min(val_images, len(val_labels)))
    val_set = ImageDataset(val_rows[keep], val_labels[keep], to_tensor_transform(dataset.channels))
    val_loader = DataLoader(val_set, batch_size=config.batch_size * 2)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    val_times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        # ABC then CBA: a load that rises or falls over a round favours no variant
        order = variants if round_ % 2 == 0 else variants[::-1]
        for variant in order:
            times[variant.name] += [variant.step() for _ in range(steps)]
        for variant in (order[0], order[-1]):
            fmt = variant.channels_last
            val_times[fmt].append(timed_validation(variant.model, val_loader, fmt))
    return {
        "times": times,
        "val_times": val_times,
        "steps_per_epoch": len(variants[0].loader),
        "val_scale": len(dataset.indices("val")) / len(keep),
        "load": open("/proc/loadavg").read().split()[:3],
        "config": config,
    }


def report(result: dict, processed: Path) -> str:
    """The markdown table of :func:`measure`'s figures."""
    times, vals, config = result["times"], result["val_times"], result["config"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    val = {fmt: statistics.median(v) * result["val_scale"] for fmt, v in vals.items()}
    lines = [
        f"Default student ({config.teacher}, `{config.strategy}`, batch {config.batch_size}, "
        f"fp32) on `{processed.name}`; {len(times['old'])} timed steps per variant in "
        f"interleaved rounds; load average at the end {' '.join(result['load'])}.",
        "",
        "| variant | s / step (median) | ratio to old | epoch estimate (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, median in medians.items():
        epoch = median * result["steps_per_epoch"] + val[name != "old"]
        lines.append(f"| {name} | {median:.2f} | {median / medians['old']:.2f} | {epoch:.0f} |")
    lines += [
        "",
        f"Validation over the split ({result['val_scale']:.1f} x the timed images): "
        f"default format {val[False]:.1f} s, channels_last {val[True]:.1f} s "
        f"(ratio {val[True] / val[False]:.2f}).",
        "",
        "All step times (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in times.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("processed", type=Path, nargs="?")
    parser.add_argument("--make-set", type=Path, help="write the timing set's .npz and stop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--val-images", type=int, default=128)
    args = parser.parse_args()
    if args.make_set:
        print(make_set(args.make_set))
        return
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the 2-core target
    result = measure(args.processed, args.rounds, args.steps, args.val_images)
    body = report(result, args.processed)
    print(body)
    write_result("train-speed", f"{machine_header()}\n\n{body}\n")


if __name__ == "__main__":
    main()
