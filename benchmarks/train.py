"""Training throughput of the default student at the default image size.

Side by side in one run, each measured over the same number of timed steps after warm-up:

- ``data path``: ``train_one_epoch`` over the real DataLoader (processed-dataset images through
  the MONAI augmentation) against ``in-memory``: the same loop over pre-made tensors, so the
  ratio shows whether the loader starves the model (target >= 90 %);
- on a GPU, ``amp + channels_last`` against a plain ``fp32`` eager loop, same model and batch
  (target >= 2x).

Prints images/s (median over ``--repeats``) and writes ``benchmarks/results/train-<device>.md``.

Usage: ``python -m benchmarks.train [--steps 20] [--repeats 3] [--device auto]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.model.student import build_student, param_groups
from tasks.model.transforms import ImageDataset, train_transform
from tasks.training.loop import (
    autocast_context,
    backward_and_step,
    dist_env,
    grad_scaler,
    resolve_device,
)


def timed_images_per_s(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    steps: int,
    warmup: int = 3,
) -> float:
    """Train steps over ``loader`` (cycled); images/s over ``steps`` after ``warmup`` steps."""
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    autocast, scaler = autocast_context(device, amp), grad_scaler(device, amp)
    model.train()
    seen, start, step = 0, None, 0
    while step < warmup + steps:
        for images, labels in loader:
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, seen = time.perf_counter(), 0
            images, labels = (
                images.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
            )
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = criterion(model(images), labels)
            backward_and_step(loss, optimizer, scaler)
            seen += len(labels)
            step += 1
            if step >= warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    train_cfg = params.train
    size, batch = params.data.image_size, train_cfg.batch_size
    device = resolve_device(args.device, dist_env())
    rng = np.random.default_rng(0)
    n = batch * 8
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 2, n)
    workers = train_cfg.num_workers if device.type == "cpu" else 4
    data_path = DataLoader(
        ImageDataset(images, labels, train_transform(train_cfg.augment, size)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    tensors = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
    in_memory = DataLoader(
        TensorDataset(tensors.to(device), torch.from_numpy(labels).to(device)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
    )

    def student() -> nn.Module:
        torch.manual_seed(0)
        model = build_student(
            train_cfg.teacher,
            train_cfg.strategy,
            2,
            unfreeze_blocks=train_cfg.unfreeze_blocks,
        )
        return model.to(device)

    variants: dict[str, tuple] = {}
    fast = device.type == "cuda"
    variants["in-memory tensors"] = (in_memory, fast, fast)
    variants["data path (DataLoader + MONAI augmentation)"] = (data_path, fast, fast)
    if device.type == "cuda":
        variants["fp32 eager, in-memory"] = (in_memory, False, False)

    results: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, (loader, amp, channels_last) in variants.items():  # interleaved: drift hits all
            model = student()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            results[name].append(
                timed_images_per_s(model, loader, device, amp, channels_last, args.steps)
            )
            print(f"run {repeat + 1} {name}: {results[name][-1]:.1f} img/s", flush=True)

    medians = {name: statistics.median(values) for name, values in results.items()}
    lines = ["| variant | images/s (median) | runs |", "| --- | ---: | --- |"]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in results[name])} |")
    ratio = medians["data path (DataLoader + MONAI augmentation)"] / medians["in-memory tensors"]
    lines += ["", f"data path / in-memory = {ratio:.2f} (target >= 0.90)"]
    if device.type == "cuda":
        speedup = medians["in-memory tensors"] / medians["fp32 eager, in-memory"]
        lines.append(f"amp + channels_last / fp32 eager = {speedup:.2f}x (target >= 2x)")
    table = "\n".join(lines)
    print(table)
    mode = (
        "bf16/fp16 autocast + channels_last"
        if device.type == "cuda"
        else "fp32 (no autocast on CPU)"
    )
    write_result(
        f"train-{device.type}",
        f"{machine_header()}\n\nStudent {train_cfg.teacher} / {train_cfg.strategy} "
        f"(unfreeze_blocks {train_cfg.unfreeze_blocks}), {size}x{size}, batch {batch}, {mode}; "
        f"{args.steps} timed steps after 3 warm-up steps, median of {args.repeats} interleaved runs; "
        f"DataLoader workers {workers}.\n\n{table}",
    )


if __name__ == "__main__":
    main()
