"""Time the robustness stage's attacks: the issue's 600 images, and the demo default.

Runs the stage's attacks through ``tasks.robustness.check.attack_at_budgets`` (FGSM, PGD,
APGD-CE on the survivors, both teacher-transfer attacks, the natural-image universal
perturbation, noise at every budget) exactly as the stage does, on synthetic chest images at the default image size,
for each ``--samples`` value: first against a freshly built default student (this crafts the
teacher-transfer perturbations), then, as the stage's default ``reference_probe: true`` does,
against a linear probe on the frozen teacher, reusing those crafted perturbations. Weights do
not change the cost of an attack, so neither model is trained. Prints the seconds of both
parts and writes ``benchmarks/results/robustness-<device>.md``.

Usage: ``python -m benchmarks.robustness [--samples 32 600] [--device auto]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.synthetic import chest_scene
from tasks.model.student import build_student, teacher_feature_extractor
from tasks.robustness.check import attack_at_budgets
from tasks.robustness.universal import natural_crops
from tasks.training.loop import dist_env, resolve_device


def synthetic_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` chest scenes, half with an opacity, as float (n, 1, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = np.stack([chest_scene(size, rng, 0.35 if label else None) for label in labels])
    return images[:, None].astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 600])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    config = params.robustness
    size = params.data.image_size
    device = resolve_device(args.device, dist_env())
    train_cfg = params.train
    torch.manual_seed(0)
    student = build_student(
        train_cfg.teacher, train_cfg.strategy, 2, unfreeze_blocks=train_cfg.unfreeze_blocks
    ).eval()
    teacher = teacher_feature_extractor(train_cfg.teacher)
    probe = build_student(train_cfg.teacher, "linear_probe", 2, dropout=0.0).eval()
    budgets = len([e for e in config.epsilons if e > 0])
    natural = natural_crops(config.universal_images, size, 0)

    rows = []
    for n in args.samples:
        images, labels = synthetic_images(n, size)
        crafted: dict = {}  # shared by both models, as in the stage
        seconds = []
        for model in (student, probe):
            start = time.perf_counter()
            attack_at_budgets(
                config,
                model,
                teacher,
                images,
                labels,
                seed=0,
                target_pool=(images, labels),
                crafted=crafted,
                natural_images=natural,
                device=str(device),
            )
            seconds.append(time.perf_counter() - start)
        rows.append((n, *seconds))
        total = sum(seconds)
        print(
            f"{n} images: student {seconds[0]:.1f} s, reference probe {seconds[1]:.1f} s, "
            f"total {total:.1f} s ({n / total:.2f} images/s)",
            flush=True,
        )

    lines = [
        "| images | budgets | PGD steps | student attacks s | frozen-teacher probe s | total s | s per budget | images/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, student_s, probe_s in rows:
        total = student_s + probe_s
        lines.append(
            f"| {n} | {budgets} | {config.pgd_steps} | {student_s:.1f} | {probe_s:.1f} | "
            f"{total:.1f} | {total / budgets:.1f} | {n / total:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_result(
        f"robustness-{device.type}",
        f"{machine_header()}\n\nAttacks of the robustness stage (FGSM, PGD, APGD-CE "
        f"({config.apgd_steps} steps), teacher-transfer untargeted and mimicry, universal "
        f"({config.universal_images} natural crops, {config.universal_steps} steps), uniform noise) at budgets {[round(e * 255, 2) for e in config.epsilons if e > 0]}/255, "
        f"{size}x{size} images, default student ({train_cfg.strategy}) then the frozen-teacher "
        f"probe (teacher-transfer perturbations crafted once, reused), device {device}. One run "
        f"each.\n\n{table}",
    )


if __name__ == "__main__":
    main()
