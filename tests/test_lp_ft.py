"""LP-FT's LP stage: the probe's L2 strength chosen on validation (an over-confident head made
the first fine-tuning steps undo the probe: benchmarks/results/lp-ft-start.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.training.features import fit_linear_head, fit_probe_on_validation


def _separable_train_and_noisy_val() -> tuple:
    """1-D features: a training split separable at 0, and a validation split where one of five
    points lies on the wrong side (an over-confident head pays for it)."""
    train_x = torch.tensor([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    train_y = np.array([0, 0, 0, 1, 1, 1])
    val_x = torch.tensor([[-1.5], [-0.7], [0.7], [1.5], [-1.0]])
    val_y = np.array([0, 0, 1, 1, 1])
    return (train_x, train_y), (val_x, val_y)


def _val_loss(head: torch.nn.Linear, val: tuple) -> float:
    with torch.no_grad():
        logits = head(val[0])
    return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(val[1])))


def test_the_lp_stage_keeps_the_l2_strength_whose_head_has_the_lowest_validation_loss() -> None:
    train, val = _separable_train_and_noisy_val()
    expected = {}
    for l2 in (1e-4, 1e-1):  # each fitted by hand from the same start
        torch.manual_seed(0)
        head = torch.nn.Linear(1, 2)
        fit_linear_head(head, train[0], train[1], None, l2)
        expected[l2] = (_val_loss(head, val), head.weight.detach().clone())
    # the weak L2 separates the training split with a steep head (weights -5.1, 5.1: loss
    # 2.04) that the noisy point punishes; the strong one (-0.74, 0.74) pays 0.50
    assert expected[1e-4][0] == pytest.approx(2.04, abs=0.01)
    assert expected[1e-1][0] == pytest.approx(0.50, abs=0.01)
    torch.manual_seed(0)
    head = torch.nn.Linear(1, 2)
    fit = fit_probe_on_validation(head, train, val, None, grid=(1e-4, 1e-1))
    assert fit.l2 == 1e-1
    assert fit.val_loss == pytest.approx(expected[1e-1][0], rel=1e-5)
    assert torch.allclose(head.weight, expected[1e-1][1], atol=1e-5)  # the chosen fit's head


def test_the_lp_stage_keeps_a_weak_l2_where_validation_rewards_a_confident_head() -> None:
    train, _ = _separable_train_and_noisy_val()
    clean_val = (torch.tensor([[-1.5], [-0.7], [0.7], [1.5]]), np.array([0, 0, 1, 1]))
    torch.manual_seed(0)
    fit = fit_probe_on_validation(torch.nn.Linear(1, 2), train, clean_val, None, (1e-4, 1e-1))
    assert fit.l2 == 1e-4


def test_lp_ft_fine_tunes_with_the_batchnorm_statistics_its_probe_was_fitted_with() -> None:
    from tasks.model.student import build_student

    images = torch.rand(4, 1, 32, 32)
    for strategy, kept in (("lp_ft", True), ("full", False)):
        student = build_student("efficientnet-lite0", strategy, 2, pretrained=False).train()
        norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        before = [m.running_mean.clone() for m in norms]
        student(images)  # a training-mode forward pass
        unchanged = all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
        assert unchanged is kept, strategy
        assert all(m.weight.requires_grad for m in norms)  # the affine weights still train
