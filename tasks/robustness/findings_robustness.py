"""Robustness of a multi-label student: how often an attack changes a finding's decision.

A multi-label model decides each finding on its own (its probability against its threshold),
so an attack's effect is a flip rate per finding (the share of images whose decision on that
finding changed) and the share of images with **any finding flipped**, each a Wilson-interval
:class:`tasks.robustness.result.Rate` over the attacked images. The attacks, at every budget of
``robustness.epsilons``:

- ``white_box``: PGD on the student's own binary cross-entropy against the true findings;
- ``teacher_transfer``: the untargeted feature attack crafted on the public teacher alone
  (:func:`tasks.robustness.attacks.teacher_transfer.craft_feature_attack`): inherited exposure;
- ``universal``: one perturbation crafted on the teacher from natural photographs
  (:func:`tasks.robustness.attacks.universal.craft_universal_perturbation`);
- ``noise``: seeded uniform noise within the budget (the control).

Metric names: ``flip_<attack>.<finding>_eps_<budget>`` and ``any_flip_<attack>_eps_<budget>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.config import RobustnessParams
from tasks.model.label_kind import MULTI_LABEL
from tasks.model.predict import run_model
from tasks.robustness.attacks._common import derive_seed, preserved_state
from tasks.robustness.attacks.teacher_transfer import craft_feature_attack
from tasks.robustness.attacks.universal import craft_universal_perturbation
from tasks.robustness.result import Rate, metric_key

ATTACKS = ("white_box", "teacher_transfer", "universal", "noise")


@dataclass
class FindingFlips:
    """The measured flip rates: ``rates[attack][eps] = (per-finding Rates (K,), any Rate)``."""

    findings: list[str]
    n_examples: int
    rates: dict[str, dict[float, tuple[list[Rate], Rate]]]

    def to_metrics(self) -> dict[str, float]:
        """``{metric name: rate}`` (see the module docstring)."""
        flat = {}
        for attack, budgets in self.rates.items():
            for eps, (per_finding, anything) in budgets.items():
                flat[metric_key(f"any_flip_{attack}", eps)] = anything.value
                for name, rate in zip(self.findings, per_finding, strict=True):
                    flat[metric_key(f"flip_{attack}.{name}", eps)] = rate.value
        return flat

    def to_table(self) -> list[dict]:
        """One row per (attack, budget, finding or ``any``): rate, its 95% Wilson interval, n."""
        rows = []
        for attack, budgets in self.rates.items():
            for eps, (per_finding, anything) in budgets.items():
                named = [*zip(self.findings, per_finding, strict=True), ("any", anything)]
                for name, rate in named:
                    low, high = rate.interval
                    rows.append(
                        {
                            "attack": attack,
                            "eps_255": round(eps * 255, 4),
                            "finding": name,
                            "flip_rate": rate.value,
                            "ci_low": low,
                            "ci_high": high,
                            "n": rate.n,
                        }
                    )
        return rows


def measure_findings(
    student: nn.Module,
    teacher_features: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    decide,
    settings: RobustnessParams,
    findings: Sequence[str],
    natural: np.ndarray,
    seed: int,
) -> FindingFlips:
    """Attack ``student`` on ``images`` float ``(N, C, H, W)`` in [0, 1] with true ``labels``
    ``(N, K)`` at every positive budget; ``decide`` maps logits ``(N, K)`` to 0/1 decisions
    ``(N, K)`` (calibrated sigmoid against each finding's threshold), ``natural`` are the
    universal perturbation's crops. Returns every flip rate."""
    clean = decide(run_model(student, images, output="logits", batch_size=settings.batch_size))
    rates: dict[str, dict[float, tuple[list[Rate], Rate]]] = {a: {} for a in ATTACKS}
    for eps in (e for e in settings.epsilons if e > 0):
        for attack in ATTACKS:
            attacked = _perturb(
                attack, student, teacher_features, images, labels, eps, settings, natural, seed
            )
            logits = run_model(student, attacked, output="logits", batch_size=settings.batch_size)
            rates[attack][eps] = flip_rates(clean, decide(logits))
    return FindingFlips(list(findings), len(images), rates)


def flip_rates(clean: np.ndarray, attacked: np.ndarray) -> tuple[list[Rate], Rate]:
    """Decisions ``(N, K)`` 0/1 before and after an attack → each finding's flip rate (the
    images whose decision on it changed) and the rate of images with any finding flipped,
    each over all N images."""
    flips = np.asarray(attacked) != np.asarray(clean)
    per_finding = [Rate.of(int(flips[:, k].sum()), len(flips)) for k in range(flips.shape[1])]
    return per_finding, Rate.of(int(flips.any(axis=1).sum()), len(flips))


def _perturb(
    attack: str,
    student: nn.Module,
    teacher: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    eps: float,
    settings: RobustnessParams,
    natural: np.ndarray,
    seed: int,
) -> np.ndarray:
    """``images`` under ``attack`` at ``eps`` (float32, within the budget, in [0, 1])."""
    attack_seed = derive_seed(seed, f"multilabel_{attack}", eps)
    if attack == "white_box":
        return bce_pgd(student, images, labels, eps, settings.pgd_steps, settings.batch_size)
    if attack == "teacher_transfer":
        return craft_feature_attack(
            teacher,
            images,
            eps,
            steps=settings.pgd_steps,
            batch_size=settings.batch_size,
            seed=attack_seed,
        )
    if attack == "universal":
        delta = craft_universal_perturbation(
            teacher,
            natural,
            eps,
            steps=settings.universal_steps,
            batch_size=settings.batch_size,
            seed=attack_seed,
        )
        return np.clip(images + delta, 0.0, 1.0).astype(np.float32)
    noise = np.random.default_rng(attack_seed).uniform(-eps, eps, images.shape)
    return np.clip(images + noise, 0.0, 1.0).astype(np.float32)


def bce_pgd(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    eps: float,
    steps: int,
    batch_size: int,
) -> np.ndarray:
    """L-inf PGD that ascends the model's binary cross-entropy against the true findings
    ``labels`` ``(N, K)``: ``steps`` signed-gradient steps of ``2.5 eps / steps`` from the
    clean images, each projected back into the budget and [0, 1]."""
    loss_fn = MULTI_LABEL.loss(reduction="sum")
    step = 2.5 * eps / max(steps, 1)
    out = []
    with preserved_state(model):
        model.eval()
        for start in range(0, len(images), batch_size):
            clean = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            target = torch.as_tensor(labels[start : start + batch_size], dtype=torch.float32)
            x = clean.clone()
            for _ in range(steps):
                x.requires_grad_(True)
                grad = torch.autograd.grad(loss_fn(model(x).float(), target), x)[0]
                x = x.detach() + step * grad.sign()
                x = torch.min(torch.max(x, clean - eps), clean + eps).clamp(0.0, 1.0)
            out.append(x.detach().numpy())
    return np.concatenate(out).astype(np.float32)
