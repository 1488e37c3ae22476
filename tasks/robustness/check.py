"""The robustness check's parts: the attacked subset, the frozen-teacher reference probe, the
attacks at every configured budget, and the per-strategy comparison.

The stage (:mod:`tasks.stages.robustness`) chains them; the robustness benchmark calls
:func:`attack_at_budgets` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.config import RobustnessParams
from tasks.data.dataset import ProcessedDataset
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.model.student_io import STRATEGIES_SUBDIR, load_student
from tasks.robustness.attacks import evaluate_robustness
from tasks.robustness.verdict import (
    EpsilonRow,
    RobustnessResult,
    format_eps,
    metric_key,
)


def attack_at_budgets(
    config: RobustnessParams,
    model: nn.Module,
    teacher: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    target_pool: tuple[np.ndarray, np.ndarray],
    crafted: dict,
    natural_images: np.ndarray | None = None,
    device: str = "cpu",
    on_budget: Callable[[EpsilonRow], None] | None = None,
) -> RobustnessResult:
    """:func:`tasks.robustness.attacks.evaluate_robustness` of ``model`` at ``config``'s
    budgets and steps.

    ``crafted``: one dict shared by every model attacked on the same images, so the
    teacher-crafted perturbations are crafted once. ``natural_images``: the universal
    perturbation's crops (:func:`tasks.robustness.universal.natural_crops`), ``None`` skips
    it. ``on_budget``: told each budget's row when its attacks are done.
    """
    return evaluate_robustness(
        model,
        teacher,
        images,
        labels,
        config.epsilons,
        pgd_steps=config.pgd_steps,
        pgd_step_size=config.pgd_step_fraction,
        batch_size=config.batch_size,
        seed=seed,
        device=device,
        apgd_steps=config.apgd_steps,
        natural_images=natural_images,
        universal_steps=config.universal_steps,
        target_pool=target_pool,
        crafted=crafted,
        on_budget=on_budget,
    )


def attack_subset(
    dataset: ProcessedDataset, max_samples: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset of the test split as float [0, 1] ``(N, 1, S, S)`` images and labels."""
    indices = dataset.indices("test")
    if max_samples is not None and len(indices) > max_samples:
        indices = np.sort(
            np.random.default_rng(seed).choice(indices, size=max_samples, replace=False)
        )
    images = uint8_to_model_pixels(dataset.images[indices])
    return images, dataset.labels[indices]


def fit_linear_probe(teacher: str, dataset: ProcessedDataset, steps: int, seed: int) -> nn.Module:
    """A linear probe on the frozen teacher: its head fitted on the train split's features.

    The backbone is never trained, so features are computed once and the head is fitted on
    them (full-batch Adam, class-balanced loss): seconds, where fine-tuning takes minutes.
    """
    from tasks.model.student import build_student

    torch.manual_seed(seed)
    probe = build_student(
        teacher, "linear_probe", num_classes=len(dataset.classes), pretrained=True, dropout=0.0
    )
    probe.eval()
    images, labels = dataset.subset("train")
    with torch.no_grad():
        features = torch.cat(
            [
                probe.features(torch.from_numpy(uint8_to_model_pixels(images[i : i + 64])))
                for i in range(0, len(images), 64)
            ]
        )
    targets = torch.from_numpy(labels)
    counts = torch.bincount(targets, minlength=len(dataset.classes)).clamp_min(1).float()
    criterion = nn.CrossEntropyLoss(weight=len(targets) / (len(counts) * counts))
    optimizer = torch.optim.Adam(probe.head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(probe.head(features), targets).backward()
        optimizer.step()
    return probe.eval()


def compare_strategies(model_dir: Path, attack, gates: dict) -> list[dict]:
    """Attack every strategy saved by a ``train.compare`` run; one table row each.

    ``attack(model, label)``: the run's attack at every budget, ``label`` naming the model in
    its progress lines."""
    rows = []
    folder = model_dir / STRATEGIES_SUBDIR
    if not folder.is_dir():
        return rows
    robust_eps = gates.get("robust_acc_eps") or 1 / 255
    transfer_eps = gates.get("teacher_transfer_eps") or 1 / 255
    universal_eps = gates.get("universal_eps") or 2 / 255
    for strategy_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        model, _ = load_student(strategy_dir)
        result = attack(model, f"saved {strategy_dir.name} student")
        metrics, intervals = result.to_metrics(), result.to_intervals()
        frozen = (
            sum(1 for m in model.frozen_modules() for p in m.parameters())
            if hasattr(model, "frozen_modules")
            else 0
        )
        rows.append(
            {
                "strategy": strategy_dir.name,  # the variant, e.g. partial+pgd
                "frozen_parameter_tensors": frozen,
                "clean_acc": result.clean_acc,
                "n_examples": result.n_examples,
                "robust_acc_pgd": metrics.get(metric_key("robust_acc_pgd", robust_eps)),
                "robust_acc_apgd": metrics.get(metric_key("robust_acc_apgd", robust_eps)),
                "teacher_transfer_success": metrics.get(
                    metric_key("teacher_transfer_success", transfer_eps)
                ),
                "teacher_mimicry_success": metrics.get(
                    metric_key("teacher_mimicry_success", transfer_eps)
                ),
                "universal_fooling": metrics.get(metric_key("universal_fooling", universal_eps)),
                "ci95": {
                    key: intervals[key]
                    for key in intervals
                    if key.endswith(format_eps(robust_eps))
                    or key.endswith(format_eps(transfer_eps))
                    or key.endswith(format_eps(universal_eps))
                },
            }
        )
    return rows
