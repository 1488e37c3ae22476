"""What else could make a CPU training step of the default student cheaper: a measurement,
not a test.

One training step (forward, backward, AdamW) of ``train`` in params.yaml (efficientnet-lite0,
batch 32, channels_last, as the loop runs it) on random ``(32, 1, S, S)`` batches, each option
its own copy of the network, timed in interleaved rounds (ABC..., then ...CBA) so drift in the
machine's load falls on every option alike:

- ``full`` at the image size (the baseline: what the default trains);
- ``full, explicit stride-1 padding (before)``: the same network with every depthwise
  convolution padded by an explicit ``SamePad2d`` copy of its input, as before the stride-1
  blocks padded in the convolution
  (:func:`tasks.model.teachers.efficientnet_lite.with_explicit_same_padding`);
- ``full, bf16 autocast`` (the CPU has AVX-512 BF16 where oneDNN uses it);
- ``full, torch.compile`` (Inductor's C++ kernels; its first step, the compilation, reported
  apart);
- ``full`` at half and three quarters of the side (what progressive resizing or a smaller
  ingest size would train at);
- ``partial`` with 8, 5 and 3 blocks fine-tuned (backward through the last blocks only).

Prints the medians and ratios to the baseline and writes
``benchmarks/results/cpu-step-options.md``. Usage: ``python -m benchmarks.cpu_step_options
[--size 128] [--rounds 5] [--steps 3] [--no-compile]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.model.student import param_groups
from tasks.model.teachers.efficientnet_lite import with_explicit_same_padding
from tasks.training.strategies import build_model

TRAIN = load_params("params.yaml").train  # the shipped training settings every option starts from


@dataclass
class Option:
    """One way of running a training step: its network, optimizer, batch and settings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor
    bf16: bool = False
    first_step_s: float | None = None

    def step(self) -> float:
        """One timed step (forward, backward, update) in seconds."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def make_option(
    name: str,
    strategy: str,
    blocks: int,
    side: int,
    bf16: bool = False,
    compiled: bool = False,
    explicit_padding: bool = False,
) -> Option:
    """The default student built for ``strategy`` (``blocks`` for partial) on ``side`` px
    batches, in channels_last, with the loop's AdamW groups; ``compiled``: its first step (the
    compilation) is run and recorded here; ``explicit_padding``: the layout from before the
    stride-1 blocks padded in their convolution."""
    config = replace(TRAIN, unfreeze_blocks=blocks)
    torch.manual_seed(0)
    model = build_model(config, strategy, num_classes=2)
    if explicit_padding:
        model = with_explicit_same_padding(model)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(
        param_groups(model, config.lr, config.backbone_lr_factor),
        lr=config.lr, weight_decay=config.weight_decay,
    )  # fmt: skip
    images = torch.rand(config.batch_size, 1, side, side)
    labels = torch.randint(0, 2, (config.batch_size,))
    option = Option(
        name,
        torch.compile(model) if compiled else model,
        optimizer,
        images.contiguous(memory_format=torch.channels_last),
        labels,
        bf16,
    )
    if compiled:
        option.first_step_s = option.step()
    return option


def options(size: int, with_compile: bool) -> list[Option]:
    """Every option of the module docstring, the baseline first."""
    made = [
        make_option("full", "full", 0, size),
        make_option(
            "full, explicit stride-1 padding (before)", "full", 0, size, explicit_padding=True
        ),
        make_option("full, bf16 autocast", "full", 0, size, bf16=True),
        make_option(f"full at {size // 2} px", "full", 0, size // 2),
        make_option(f"full at {size * 3 // 4} px", "full", 0, size * 3 // 4),
        make_option("partial, 8 blocks", "partial", 8, size),
        make_option("partial, 5 blocks", "partial", 5, size),
        make_option("partial, 3 blocks", "partial", 3, size),
    ]
    if with_compile:
        made.append(make_option("full, torch.compile", "full", 0, size, compiled=True))
    return made


def timed(made: list[Option], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds of every step after one warm-up each, per option, in alternating order."""
    for option in made:
        option.step()
    times: dict[str, list[float]] = {option.name: [] for option in made}
    for round_number in range(rounds):
        order = made if round_number % 2 == 0 else made[::-1]
        for option in order:
            times[option.name] += [option.step() for _ in range(steps)]
        print(f"round {round_number + 1}/{rounds} done", flush=True)
    return times


def table(made: list[Option], times: dict[str, list[float]], size: int) -> str:
    """The markdown result: median step, its ratio to the baseline, and how many steps."""
    base = statistics.median(times[made[0].name])
    lines = [
        f"One training step of the default student (batch 32, channels_last) at {size} px "
        "unless named, interleaved rounds; median over the steps.",
        "",
        "| option | median step s | ratio to full | steps | first step s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for option in made:
        median = statistics.median(times[option.name])
        first = f"{option.first_step_s:.0f}" if option.first_step_s is not None else "-"
        lines.append(
            f"| {option.name} | {median:.3f} | {median / base:.2f} "
            f"| {len(times[option.name])} | {first} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    made = options(args.size, not args.no_compile)
    body = table(made, timed(made, args.rounds, args.steps), args.size)
    print(body)
    print(f"written {write_result('cpu-step-options', machine_header() + chr(10) * 2 + body)}")


if __name__ == "__main__":
    main()
