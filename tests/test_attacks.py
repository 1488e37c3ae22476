"""Attacks, the teacher-transfer check, robustness metrics and promotion gates.

The victim is a tiny CNN trained for a few dozen steps to tell a bright square from a dark one
on a noisy 32x32 background: clean accuracy is perfect, yet nothing made it robust, so an
8/255 white-box attack breaks it. Its "teacher" is a frozen copy of its own trunk, the
situation the teacher-transfer attack is about (a student that kept the public backbone).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.config import RobustnessParams, load_params
from tasks.errors import MedtransferError
from tasks.robustness.attacks._common import (
    AttackOutcome,
    as_pixel_array,
    check_step_fraction,
    predict,
)
from tasks.robustness.attacks.noise import noise_attack
from tasks.robustness.attacks.square import square_attack
from tasks.robustness.attacks.teacher_transfer import (
    choose_mimicry_targets,
    teacher_transfer_attack,
)
from tasks.robustness.attacks.white_box import apgd_attack, fgsm_attack, pgd_attack
from tasks.robustness.gates import gate_verdict
from tasks.robustness.plots import ReferenceCurve, plot_robustness_curves, robustness_figure
from tasks.robustness.result import (
    EpsilonRow,
    Rate,
    RobustnessResult,
    format_eps,
    metric_key,
)
from tasks.robustness.suite import evaluate_robustness

EPS_8 = 8 / 255
SIZE = 32
# The shipped robustness settings; each test replaces what it varies.
DEFAULTS = load_params(Path(__file__).resolve().parents[1] / "params.yaml").robustness


def settings(epsilons: list[float], **overrides) -> RobustnessParams:
    """The robustness section with these budgets (pixel units) and overrides."""
    budgets = tuple(eps * 255 for eps in epsilons)
    cheap_square = {"square_max_samples": 8, "square_queries": 5}  # its own tests go further
    return dataclasses.replace(DEFAULTS, epsilons_255=budgets, **{**cheap_square, **overrides})


# Floats in [0, 1] are exact to ~6e-8; ART works in float32.
FLOAT_TOL = 1e-6


def make_squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 32x32 images, each with an 8x8 square: bright (label 1) or dark (label 0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0.5, 0.08, (n, 1, SIZE, SIZE))
    for i, label in enumerate(labels):
        row, col = rng.integers(0, SIZE - 8, 2)
        images[i, 0, row : row + 8, col : col + 8] = 0.8 if label else 0.2
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int64)


class TinyCNN(nn.Module):
    """Pixel space in, logits out; normalises internally, like the real student."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk((x - 0.5) / 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureExtractor(nn.Module):
    """The frozen "public teacher": (B, 1, H, W) in [0, 1] -> (B, 16) features."""

    def __init__(self, model: TinyCNN) -> None:
        super().__init__()
        self.model = model
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class _RefuseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a gradient flowed back through the student")


class GradientRefusingStudent(nn.Module):
    """Wraps a student: raises if anything backpropagates through it, and records whether it
    was ever called with gradients enabled."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.calls_with_grad = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.calls_with_grad += int(torch.is_grad_enabled() or x.requires_grad)
        return _RefuseBackward.apply(self.inner(x))


def train_tiny(perturb=None) -> TinyCNN:
    """The toy student after 40 Adam steps on squares; ``perturb(model, x, y)`` (a training
    loop hook such as PGD adversarial training) replaces each batch when given."""
    torch.manual_seed(0)
    train_x, train_y = make_squares(256, seed=1)
    model = TinyCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x), (32,), generator=generator)
        batch = x[idx] if perturb is None else perturb(model, x[idx], y[idx])
        loss = nn.functional.cross_entropy(model(batch), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def toy() -> dict:
    model = train_tiny()
    images, labels = make_squares(64, seed=2)
    teacher = FeatureExtractor(copy.deepcopy(model))
    clean_acc = float(np.mean(predict(model, images) == labels))
    return {
        "model": model,
        "teacher": teacher,
        "images": images,
        "labels": labels,
        "clean": clean_acc,
    }


def all_attacks(toy: dict, eps: float) -> dict[str, AttackOutcome]:
    model, teacher, images, labels = toy["model"], toy["teacher"], toy["images"], toy["labels"]
    return {
        "fgsm": fgsm_attack(model, images, labels, eps),
        "pgd": pgd_attack(model, images, labels, eps, steps=5, seed=3),
        "transfer": teacher_transfer_attack(model, teacher, images, labels, eps, steps=5, seed=3),
        "mimicry": teacher_transfer_attack(
            model, teacher, images, labels, eps, mode="mimicry", steps=5, seed=3
        ),
        "noise": noise_attack(model, images, labels, eps, seed=3),
    }


def test_toy_student_is_accurate(toy):
    assert toy["clean"] >= 0.95


def test_budget_zero_changes_no_image_and_no_prediction(toy):
    clean_predictions = predict(toy["model"], toy["images"])
    for name, outcome in all_attacks(toy, 0.0).items():
        np.testing.assert_array_equal(outcome.adversarial, toy["images"], err_msg=name)
        np.testing.assert_array_equal(outcome.predictions, clean_predictions, err_msg=name)
        assert outcome.accuracy == pytest.approx(toy["clean"]), name


def test_art_refuses_a_zero_step_which_is_why_budget_zero_skips_it(toy):
    # Canary for an ART upgrade: eps=0 itself is accepted, a zero step (eps/4 at eps=0) is not.
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        toy["model"], nn.CrossEntropyLoss(), input_shape=(1, SIZE, SIZE), nb_classes=2,
        clip_values=(0.0, 1.0),
    )  # fmt: skip
    with pytest.raises(ValueError, match="step-size"):
        ProjectedGradientDescentPyTorch(classifier, eps=0.0, eps_step=0.0, verbose=False)
    with pytest.raises(TypeError):  # numpy float32 budgets are refused: we pass Python floats
        ProjectedGradientDescentPyTorch(
            classifier, eps=np.float32(0.1), eps_step=np.float32(0.01), verbose=False
        )
    # ...and our wrapper accepts both.
    outcome = pgd_attack(toy["model"], toy["images"][:4], toy["labels"][:4], np.float32(0.0))
    np.testing.assert_array_equal(outcome.adversarial, toy["images"][:4])


def test_pgd_at_8_over_255_breaks_the_undefended_student(toy):
    fgsm = fgsm_attack(toy["model"], toy["images"], toy["labels"], EPS_8)
    pgd = pgd_attack(toy["model"], toy["images"], toy["labels"], EPS_8, steps=10, seed=0)
    assert pgd.accuracy < toy["clean"] - 0.3
    # PGD iterates from FGSM's direction with restarts inside the ball: never weaker here.
    assert pgd.accuracy <= fgsm.accuracy


def test_pgd_is_reproducible_with_a_seed_and_leaves_numpy_global_state_alone(toy):
    images, labels = toy["images"][:16], toy["labels"][:16]
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    # Small steps, so that where the random start lies still shows in the result (large ones
    # drive every pixel to a corner of the ball whatever the start).
    kwargs = {"steps": 2, "step_size": 0.5 / 255}
    first = pgd_attack(toy["model"], images, labels, 4 / 255, seed=7, **kwargs)
    assert np.random.rand() == expected_next
    second = pgd_attack(toy["model"], images, labels, 4 / 255, seed=7, **kwargs)
    other = pgd_attack(toy["model"], images, labels, 4 / 255, seed=8, **kwargs)
    np.testing.assert_array_equal(first.adversarial, second.adversarial)
    assert not np.array_equal(first.adversarial, other.adversarial)


def test_perturbations_stay_within_budget_and_pixel_range(toy):
    images = toy["images"].copy()
    # Saturated pixels: a perturbation must be clipped to [0, 1], not just to the ball.
    images[:, :, :4, :] = 0.0
    images[:, :, -4:, :] = 1.0
    eps = 6 / 255
    saturated = {**toy, "images": images}
    for name, outcome in all_attacks(saturated, eps).items():
        delta = outcome.adversarial.astype(np.float64) - images
        assert np.abs(delta).max() <= eps + FLOAT_TOL, name
        assert np.abs(delta).max() > eps / 2, f"{name} did not perturb"
        assert outcome.adversarial.min() >= 0.0 and outcome.adversarial.max() <= 1.0, name
        assert outcome.adversarial.dtype == np.float32 and outcome.adversarial.shape == images.shape


def test_the_gradient_refusing_wrapper_does_refuse(toy):
    # Guards the next test: the wrapper must really catch a backward pass.
    student = GradientRefusingStudent(copy.deepcopy(toy["model"]))
    logits = student(torch.from_numpy(toy["images"][:2]).requires_grad_(True))
    assert student.calls_with_grad == 1
    with pytest.raises(AssertionError, match="flowed back"):
        logits.sum().backward()


@pytest.mark.parametrize("mode", ["untargeted", "mimicry"])
def test_teacher_transfer_never_computes_gradients_through_the_student(toy, mode):
    student = GradientRefusingStudent(copy.deepcopy(toy["model"]))
    student.train()  # the attack must evaluate in eval mode and give the mode back
    for param in student.parameters():
        assert param.requires_grad and param.grad is None
    # A teacher whose parameters could collect gradients: crafting must not fill them either.
    teacher = copy.deepcopy(toy["teacher"]).requires_grad_(True)
    outcome = teacher_transfer_attack(
        student, teacher, toy["images"], toy["labels"], EPS_8, mode=mode, steps=3, seed=0
    )
    assert student.calls > 0
    assert student.calls_with_grad == 0
    assert all(param.grad is None for param in student.parameters())
    assert all(module.training for module in student.modules())
    assert all(param.grad is None for param in teacher.parameters())
    # the accuracy is the unwrapped student's on the perturbed images, counted plainly
    with torch.no_grad():
        inner = copy.deepcopy(toy["model"]).eval()
        plain = inner(torch.from_numpy(outcome.adversarial)).argmax(1).numpy()
    assert outcome.accuracy == pytest.approx(np.mean(plain == toy["labels"]))


def test_teacher_transfer_hurts_a_student_that_kept_the_teacher_backbone(toy):
    outcomes = all_attacks(toy, EPS_8)
    noise = outcomes["noise"]
    # Mimicry moves the shared features onto the other class's: the head must follow.
    assert outcomes["mimicry"].success_rate > 0.5
    assert outcomes["transfer"].accuracy < noise.accuracy
    assert outcomes["transfer"].clean_correct == round(toy["clean"] * len(toy["labels"]))


def test_noise_at_a_small_budget_barely_changes_accuracy(toy):
    noise = noise_attack(toy["model"], toy["images"], toy["labels"], 2 / 255, seed=0)
    assert noise.accuracy >= toy["clean"] - 0.05
    assert not np.array_equal(noise.adversarial, toy["images"])


def test_mimicry_targets_are_other_class_and_seeded():
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    pool_labels = np.array([0, 1, 2, 0, 1, 2])
    targets = choose_mimicry_targets(labels, pool_labels, seed=5)
    assert targets.shape == labels.shape
    assert np.all(pool_labels[targets] != labels)
    np.testing.assert_array_equal(targets, choose_mimicry_targets(labels, pool_labels, seed=5))
    with pytest.raises(MedtransferError, match="single class"):
        choose_mimicry_targets(np.array([0, 1]), np.array([1, 1]), seed=0)


def test_inputs_and_parameters_are_validated(toy):
    with pytest.raises(MedtransferError, match=r"\[0, 1\]"):
        as_pixel_array(toy["images"] * 255)
    with pytest.raises(MedtransferError, match="N, C, H, W"):
        as_pixel_array(toy["images"][:, 0])
    with pytest.raises(MedtransferError, match="eps"):
        pgd_attack(toy["model"], toy["images"], toy["labels"], -1 / 255)
    # An absolute step (0.5/255) passed where a fraction of eps is expected must not silently
    # weaken PGD.
    with pytest.raises(MedtransferError, match="fraction"):
        check_step_fraction(0.5 / 255, 10)
    assert check_step_fraction(None, 10) == pytest.approx(0.25)


def test_evaluate_robustness_end_to_end_and_restores_the_student(toy):
    student = copy.deepcopy(toy["model"])
    student.train()
    result = evaluate_robustness(
        student, toy["teacher"], toy["images"][:32], toy["labels"][:32],
        settings([EPS_8, 0.0, 1 / 255], pgd_steps=5, pgd_step_fraction=None, batch_size=16),
        seed=0,
    )  # fmt: skip
    assert result.epsilons == pytest.approx((0.0, 1 / 255, EPS_8))
    zero = result.row(0.0)
    for measure in ("robust_acc_fgsm", "robust_acc_pgd", "teacher_transfer_acc", "noise_acc"):
        assert zero[measure] == pytest.approx(result.clean_acc)
    assert zero["teacher_transfer_success"] == 0.0 and zero["teacher_mimicry_success"] == 0.0
    assert result.row(EPS_8)["robust_acc_pgd"] < result.clean_acc - 0.3
    # the reported white-box figure is the worst case: never above FGSM or PGD at its budget,
    # never rising with the budget
    worst = [row["robust_acc_apgd"] for row in result.rows]
    assert worst == sorted(worst, reverse=True) and worst[0] == result.clean_acc
    for row in result.rows:
        assert row["robust_acc_apgd"] <= min(row["robust_acc_fgsm"], row["robust_acc_pgd"])
    # ART leaves the model in eval mode with gradients in every parameter, and the attacks
    # freeze parameters while they run; the student must come back as it was.
    assert all(module.training for module in student.modules())
    assert all(param.grad is None and param.requires_grad for param in student.parameters())
    # the attacks ran its convolutions in channels_last; its own tensors come back unchanged
    assert all(param.is_contiguous() for param in student.parameters())
    for name, value in student.state_dict().items():
        assert torch.equal(value, toy["model"].state_dict()[name]), name


class MeanOfAllButCorner(nn.Module):
    """A student that reads only the mean of every pixel except (0, 0): class 1 when it is
    above 0.5. Logits ``[-z, z]`` with ``z = 200 * (mean - 0.5)``."""

    def __init__(self, side: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(side * side, 1)
        with torch.no_grad():
            weight = torch.full((side * side,), 200.0 / (side * side - 1))
            weight[0] = 0.0  # blind to the corner pixel
            self.linear.weight.copy_(weight[None])
            self.linear.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(start_dim=1))
        return torch.cat([-z, z], dim=1)


class CornerPixelTeacher(nn.Module):
    """A teacher unrelated to the student: its only feature is pixel (0, 0), which the
    student ignores."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0] * self.scale


def test_evaluate_robustness_crafts_the_teacher_transfer_attack_on_the_teacher_alone():
    # 16 images at 0.5 +- eps / 4 (class 1 above), corner pixels random. A perturbation crafted
    # on the corner-pixel teacher moves the corner (which the student ignores) plus the random
    # start: uniform in +-eps / 2 per pixel, which shifts the mean by sd 0.0011, 7 sd short of
    # the margin 0.0078. So both teacher-transfer success rates are exactly 0. Crafted on the
    # student instead, mimicry moves every image across (rate 1) and the untargeted push about
    # half of them; white-box FGSM at eps fools every image (the margin is eps / 4).
    eps = 8 / 255
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 8)
    images = np.where(labels == 1, 0.5 + eps / 4, 0.5 - eps / 4)[:, None, None, None]
    images = np.broadcast_to(images, (16, 1, 8, 8)).astype(np.float32).copy()
    images[:, 0, 0, 0] = rng.uniform(0.0, 1.0, 16)
    result = evaluate_robustness(
        MeanOfAllButCorner(), CornerPixelTeacher(), images, labels,
        settings([eps], pgd_steps=10, apgd_steps=5, batch_size=16), seed=0,
    )  # fmt: skip
    row = result.row(eps)
    assert result.clean_acc == 1.0
    assert (row["teacher_transfer_success"], row["teacher_mimicry_success"]) == (0.0, 0.0)
    assert row["teacher_transfer_acc"] == row["teacher_mimicry_acc"] == 1.0
    assert row["robust_acc_fgsm"] == 0.0  # the student is fragile: an attack crafted on it succeeds


def _result(n: int = 10, **overrides: float) -> RobustnessResult:
    """Nine measures at three budgets on ``n`` images, 90% of them clean-correct."""

    def row(eps: float) -> EpsilonRow:
        values = dict(
            robust_acc_fgsm=0.7, robust_acc_pgd=0.6, teacher_transfer_acc=0.8,
            teacher_transfer_success=0.1, teacher_mimicry_acc=0.75, teacher_mimicry_success=0.2,
            noise_acc=0.9, robust_acc_apgd=0.6, universal_fooling=0.1,
        )  # fmt: skip
        values.update(overrides if eps > 0 else {})
        sizes = {name: round(0.9 * n) if name.endswith("_success") else n for name in values}
        return EpsilonRow(eps, {name: Rate(v, sizes[name]) for name, v in values.items()})

    return RobustnessResult(
        clean_acc=0.9, n_examples=n, rows=(row(0.0), row(1 / 255), row(4 / 255)),
        pgd_steps=10, pgd_step_size=0.25, seed=0,
    )  # fmt: skip


GATES = {
    "min_clean_auc": 0.75,
    "min_robust_acc": 0.5,
    "robust_acc_eps": 1 / 255,
    "max_teacher_transfer_success": 0.5,
    "teacher_transfer_eps": 1 / 255,
}


def test_metric_keys_are_flat_formatted_and_valid_mlflow_names():
    metrics = _result().to_metrics()
    assert format_eps(1 / 255) == "0.0039" and format_eps(8 / 255) == "0.0314"
    assert metric_key("robust_acc_pgd", 1 / 255) == "robust_acc_pgd_eps_0.0039"
    assert metrics["robust_acc_pgd_eps_0.0039"] == 0.6
    assert metrics["teacher_transfer_success_eps_0.0157"] == 0.1
    assert metrics["noise_acc_eps_0.0000"] == 0.9
    assert metrics["clean_acc"] == 0.9
    assert len(metrics) == 1 + 3 * 9
    # MLflow's rule for metric names on every platform (its validation module); "@" fails it.
    for key in metrics:
        assert re.fullmatch(r"[/\w.\- ]+", key), key
    table = _result().to_table()
    assert [row["eps_255"] for row in table] == pytest.approx([0.0, 1.0, 4.0])
    assert table[1]["robust_acc_pgd"] == 0.6 and table[1]["clean_acc"] == 0.9


def test_budgets_that_share_a_metric_name_are_refused(toy):
    with pytest.raises(MedtransferError, match="metric names"):
        evaluate_robustness(
            toy["model"], toy["teacher"], toy["images"][:4], toy["labels"][:4],
            settings([0.00391, 0.00392]),
        )  # fmt: skip


def test_gate_verdict_passes_a_good_student():
    verdict = gate_verdict(_result().to_metrics(), clean_auc=0.9, gates=GATES)
    assert verdict.passed and verdict.reasons == []
    assert len(verdict.checked) == 3 and all(line.startswith("PASS") for line in verdict.checked)


def test_gate_verdict_names_each_failed_gate():
    metrics = _result(robust_acc_apgd=0.2, teacher_mimicry_success=0.7).to_metrics()
    verdict = gate_verdict(metrics, clean_auc=0.6, gates=GATES)
    assert not verdict.passed
    assert len(verdict.reasons) == 3
    auc = verdict.reasons[0]
    (robust,) = [reason for reason in verdict.reasons if "robust accuracy" in reason]
    (transfer,) = [reason for reason in verdict.reasons if "teacher-transfer" in reason]
    assert "clean AUC is 0.600" in auc and "0.750" in auc
    assert "APGD-CE) robust accuracy" in robust and "0.200" in robust and "0.0039" in robust
    # The stronger of the two transfer attacks (mimicry here) decides.
    assert "mimicry" in transfer and "0.700" in transfer


def test_gate_verdict_fails_on_one_gate_only_and_on_nan():
    verdict = gate_verdict(_result(robust_acc_apgd=0.4).to_metrics(), clean_auc=0.9, gates=GATES)
    assert not verdict.passed and len(verdict.reasons) == 1 and "APGD" in verdict.reasons[0]
    nan_metrics = _result(teacher_transfer_success=math.nan).to_metrics()
    verdict = gate_verdict(nan_metrics, clean_auc=0.9, gates=GATES)
    assert not verdict.passed and "undefined" in verdict.reasons[0]


def test_gate_budget_is_matched_by_its_formatting_and_unmeasured_budgets_are_errors():
    metrics = _result().to_metrics()
    assert gate_verdict(metrics, 0.9, {**GATES, "robust_acc_eps": 0.0039}).passed
    with pytest.raises(MedtransferError, match=r"robust_acc_apgd_eps_0\.0078.*0\.0039"):
        gate_verdict(metrics, 0.9, {**GATES, "robust_acc_eps": 2 / 255})
    with pytest.raises(MedtransferError, match="Unknown robustness gates"):
        gate_verdict(metrics, 0.9, {**GATES, "min_robust_accuracy": 0.5})
    with pytest.raises(MedtransferError, match="teacher_transfer_eps"):
        gate_verdict(metrics, 0.9, {"max_teacher_transfer_success": 0.5})
    # A null threshold switches its gate off.
    assert gate_verdict(metrics, 0.1, {**GATES, "min_clean_auc": None}).passed


def test_gates_decide_on_the_intervals_unfavourable_bound():
    # 6 of 10 robust: Wilson 95% interval 0.313-0.832, below a 0.5 minimum at its lower bound
    small = _result(robust_acc_apgd=0.6, teacher_mimicry_success=0.0)
    verdict = gate_verdict(small.to_metrics(), 0.9, GATES, result=small)
    assert not verdict.passed and len(verdict.reasons) == 1
    assert "0.600 (95% CI 0.313-0.832, n=10)" in verdict.reasons[0]
    large = _result(n=1000, robust_acc_apgd=0.6, teacher_mimicry_success=0.0)  # 0.569-0.630
    assert gate_verdict(large.to_metrics(), 0.9, GATES, result=large).passed
    # a clean AUC of 0.9 whose interval reaches down to 0.7 does not clear 0.75
    verdict = gate_verdict(
        large.to_metrics(), 0.9, GATES, result=large, clean_auc_interval=(0.7, 0.97), n_test=55
    )
    assert not verdict.passed and "0.900 (95% CI 0.700-0.970, n=55)" in verdict.reasons[0]
    # a success rate passes only if its upper bound is within the maximum: 1 of 9 clean-correct
    # flipped is 0.111 (0.020-0.435)
    gates = {"max_teacher_transfer_success": 0.4, "teacher_transfer_eps": 1 / 255}
    transfer = _result(teacher_transfer_success=1 / 9, teacher_mimicry_success=0.0)
    verdict = gate_verdict(transfer.to_metrics(), 0.9, gates, result=transfer)
    assert not verdict.passed and "0.111 (95% CI 0.020-0.435, n=9)" in verdict.reasons[0]
    assert gate_verdict(transfer.to_metrics(), 0.9, gates).passed  # the estimate alone would pass


def test_universal_gate_fails_on_the_fooling_rates_upper_bound():
    gates = {"max_universal_fooling": 0.3, "universal_eps": 1 / 255}
    result = _result(universal_fooling=0.1)  # 1 of 10: 0.018-0.404
    verdict = gate_verdict(result.to_metrics(), 0.9, gates, result=result)
    assert (
        not verdict.passed and "universal" in verdict.reasons[0] and "0.404" in verdict.reasons[0]
    )
    with pytest.raises(MedtransferError, match="universal_eps"):
        gate_verdict(result.to_metrics(), 0.9, {"max_universal_fooling": 0.3})


class PeriodicMargin(nn.Module):
    """A classifier one large step fools less than a small one: class 1 while the image's mean
    brightness ``m`` stays near a peak of ``cos(2 pi (m - 0.5) / PERIOD)`` (margin above 0.5).

    FGSM pushes ``m`` away from the peak by exactly its budget, so from ``0.5 + PERIOD / 12``
    a quarter period lands in the trough (class 0) and a whole period back on a peak (class
    1): per budget, FGSM at ``PERIOD`` scores higher than at ``PERIOD / 4``.
    """

    PERIOD = 8 / 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=(1, 2, 3))
        margin = torch.cos(2 * math.pi * (brightness - 0.5) / self.PERIOD) - 0.5
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


def test_each_white_box_line_keeps_an_image_fooled_at_a_smaller_budget_fooled(toy):
    model, period = PeriodicMargin(), PeriodicMargin.PERIOD
    images = np.full((8, 1, SIZE, SIZE), 0.5 + period / 12, dtype=np.float32)
    labels = np.ones(8, dtype=np.int64)
    quarter, whole = period / 4, period
    # the model does what it is built for: FGSM alone overshoots back into the right class
    assert fgsm_attack(model, images, labels, quarter).accuracy == 0.0
    assert fgsm_attack(model, images, labels, whole).accuracy == 1.0

    result = evaluate_robustness(
        model, toy["teacher"], images, labels,
        settings([quarter, whole], pgd_steps=3, pgd_step_fraction=None), seed=0,
        target_pool=(toy["images"], toy["labels"]),
    )  # fmt: skip
    assert result.clean_acc == 1.0
    # fooled at a quarter period means fooled within a whole one: every line stays at 0
    for row in (result.row(quarter), result.row(whole)):
        lines = ("robust_acc_fgsm", "robust_acc_pgd", "robust_acc_apgd")
        assert tuple(row[line] for line in lines) == (0.0, 0.0, 0.0), row.eps


def test_apgd_accuracy_does_not_rise_with_the_budget_beyond_its_interval(toy):
    from tasks.evaluation.metrics import wilson_interval

    images, labels = toy["images"][:32], toy["labels"][:32]
    n = len(labels)
    accuracies = [
        apgd_attack(toy["model"], images, labels, eps / 255, steps=5, seed=1).accuracy
        for eps in (2, 4, 8)
    ]
    for smaller, larger in itertools.pairwise(accuracies):
        assert larger <= wilson_interval(round(smaller * n), n)[1]
    # and APGD does not give up where a 3-step PGD overshoots
    pgd = pgd_attack(toy["model"], images, labels, EPS_8, steps=3, seed=1).accuracy
    assert accuracies[-1] <= pgd and accuracies[-1] < 0.5


def test_pgd_training_beats_the_plain_student_under_the_pgd_it_is_measured_with(toy):
    """Adversarial training and the evaluation share one PGD: a no-op training hook fails this."""
    from tasks.training.adversarial import pgd_perturbation

    defended = train_tiny(pgd_perturbation(EPS_8, steps=3))
    images, labels = toy["images"], toy["labels"]
    plain = pgd_attack(toy["model"], images, labels, EPS_8, steps=5, seed=2)
    robust = pgd_attack(defended, images, labels, EPS_8, steps=5, seed=2)
    n = len(labels)
    assert robust.accuracy >= 0.9
    # the intervals separate: the defended lower bound is above the plain upper bound
    from tasks.evaluation.metrics import wilson_interval

    plain_high = wilson_interval(round(plain.accuracy * n), n)[1]
    assert wilson_interval(round(robust.accuracy * n), n)[0] > plain_high


def test_plot_writes_a_png_with_a_reference_curve(tmp_path):
    result = _result()
    reference = ReferenceCurve.from_result(
        _result(robust_acc_pgd=0.3), "linear probe (frozen teacher)"
    )
    path = plot_robustness_curves(
        result, tmp_path / "plots" / "robustness.png", reference=reference
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_robustness_plot_has_a_95pc_band_per_curve_and_a_legend_beside_the_axes():
    from tasks.evaluation.metrics import wilson_interval

    figure = robustness_figure(_result(n=10))
    (axes,) = figure.axes
    labels = [line.get_label() for line in axes.lines]
    bands = axes.collections
    assert len(bands) == len([label for label in labels if not label.startswith("clean")])
    # the first curve (uniform noise, 0.9 of 10 images) at 1/255: the Wilson interval of 9/10
    assert labels[0] == "uniform noise accuracy"
    low, high = wilson_interval(9, 10)
    band = bands[0].get_paths()[0].vertices
    at_one = band[np.isclose(band[:, 0], 1.0)][:, 1]
    assert sorted(at_one)[0] == pytest.approx(low) and sorted(at_one)[-1] == pytest.approx(high)
    figure.canvas.draw()  # the legend sits wholly right of the axes: it hides no curve
    legend = axes.get_legend().get_window_extent()
    assert legend.x0 >= axes.get_window_extent().x1
    assert len(axes.get_legend().get_texts()) == len(labels)


def test_an_attack_that_is_off_has_no_curve_and_no_legend_entry():
    from tasks.robustness.result import NOT_MEASURED

    result = _result(n=10)
    rows = tuple(
        EpsilonRow(row.eps, {**row.rates, "square_acc": NOT_MEASURED}) for row in result.rows
    )
    figure = robustness_figure(dataclasses.replace(result, rows=rows))
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "uniform noise accuracy" in labels
    assert not any("Square" in label for label in labels)
    assert len(labels) == len(robustness_figure(result).axes[0].get_legend().get_texts())


def test_crafted_teacher_perturbations_are_shared_between_students(toy):
    """A second student scored with the same cache reuses the teacher-crafted images."""

    class CountingTeacher(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    teacher = CountingTeacher(toy["teacher"])
    crafted: dict = {}
    first = teacher_transfer_attack(
        toy["model"], teacher, toy["images"], toy["labels"], EPS_8, steps=3, seed=0, crafted=crafted
    )
    calls = teacher.calls
    other = copy.deepcopy(toy["model"])
    second = teacher_transfer_attack(
        other, teacher, toy["images"], toy["labels"], EPS_8, steps=3, seed=0, crafted=crafted
    )
    assert calls > 0 and teacher.calls == calls  # nothing crafted the second time
    np.testing.assert_array_equal(first.adversarial, second.adversarial)
    uncached = teacher_transfer_attack(
        other, teacher, toy["images"], toy["labels"], EPS_8, steps=3, seed=0
    )
    np.testing.assert_array_equal(uncached.adversarial, first.adversarial)


def test_universal_perturbation_from_natural_images_fools_the_student_more_than_noise(toy):
    from tasks.robustness.attacks.universal import (
        craft_universal_perturbation,
        natural_crops,
        universal_fooling_rate,
    )

    natural = natural_crops(8, SIZE, seed=0)
    assert natural.shape == (8, 1, SIZE, SIZE) and natural.dtype == np.float32
    np.testing.assert_array_equal(natural, natural_crops(8, SIZE, seed=0))  # seeded
    assert natural.min() >= 0.0 and natural.max() <= 1.0 and natural.std() > 0.05
    delta = craft_universal_perturbation(toy["teacher"], natural, EPS_8, steps=5, seed=0)
    assert delta.shape == (1, 1, SIZE, SIZE) and np.abs(delta).max() <= EPS_8 + FLOAT_TOL
    images = toy["images"]
    clean_predictions = predict(toy["model"], images)
    rate, count = universal_fooling_rate(toy["model"], images, delta, clean_predictions)
    assert rate == pytest.approx(count / len(images))
    signs = np.random.default_rng(0).choice([-EPS_8, EPS_8], size=delta.shape).astype(np.float32)
    noise_rate, _ = universal_fooling_rate(toy["model"], images, signs, clean_predictions)
    assert rate > noise_rate + 0.2


class MeanBrightness(nn.Module):
    """Class 1 when an image's mean brightness is above 0.5: images 1/255 above it are
    correct and fooled by any perturbation that darkens them by more than that on average."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = (x.mean(dim=(1, 2, 3)) - 0.5) * 100
        return torch.stack([-margin, margin], dim=1)


class Constant(nn.Module):
    """Always class 1, whatever the image: nothing can fool it."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 2) + 0 * x.mean()


def test_square_attack_fools_a_model_it_must_and_never_one_that_ignores_the_image():
    images = np.full((8, 1, SIZE, SIZE), 0.5 + 1 / 255, dtype=np.float32)
    labels = np.ones(8, dtype=np.int64)
    assert np.all(predict(MeanBrightness(), images) == 1)
    fooled = square_attack(MeanBrightness(), images, labels, 4 / 255, queries=20, seed=0)
    assert fooled.accuracy == 0.0  # a no-op attack scores 1.0 here
    assert np.abs(fooled.adversarial - images).max() <= 4 / 255 + FLOAT_TOL
    assert square_attack(Constant(), images, labels, 8 / 255, queries=5).accuracy == 1.0


def test_square_attack_only_queries_the_student_and_is_seeded(toy):
    student = GradientRefusingStudent(copy.deepcopy(toy["model"]))
    images, labels = toy["images"][:8], toy["labels"][:8]
    first = square_attack(student, images, labels, EPS_8, queries=5, seed=4)
    assert student.calls > 5 and student.calls_with_grad == 0
    again = square_attack(student, images, labels, EPS_8, queries=5, seed=4)
    np.testing.assert_array_equal(first.adversarial, again.adversarial)


def test_square_success_is_measured_per_budget_and_gated_on_its_upper_bound(toy):
    result = evaluate_robustness(
        MeanBrightness(), toy["teacher"],
        np.full((10, 1, SIZE, SIZE), 0.5 + 1 / 255, dtype=np.float32), np.ones(10, np.int64),
        settings([4 / 255], pgd_steps=1, apgd_steps=1, square_max_samples=10, square_queries=20),
        target_pool=(toy["images"], toy["labels"]),
    )  # fmt: skip
    assert result.row(0.0)["square_success"] == 0.0
    assert result.row(4 / 255)["square_success"] == 1.0  # 10 of 10: Wilson 0.722-1
    metrics = result.to_metrics()
    verdict = gate_verdict(metrics, 0.9, {"max_square_success": 0.8, "square_eps": 4 / 255})
    assert not verdict.passed and "Square" in verdict.reasons[0]
    lenient = gate_verdict(metrics, 0.9, {"max_square_success": None}, result=result)
    assert lenient.passed and lenient.checked == []  # off by default (null)
    off = evaluate_robustness(
        MeanBrightness(), toy["teacher"], np.full((4, 1, SIZE, SIZE), 0.6, dtype=np.float32),
        np.ones(4, np.int64), settings([4 / 255], pgd_steps=1, square_max_samples=0),
        target_pool=(toy["images"], toy["labels"]),
    )  # fmt: skip
    assert math.isnan(off.row(4 / 255)["square_success"])


def test_registered_attacks_declare_distinct_measures_and_the_gates_params_yaml_holds():
    from tasks.robustness.gates import known_gates
    from tasks.robustness.suite import all_measures, registered_attacks

    attacks = registered_attacks()
    assert {attack.name for attack in attacks} >= {
        "white_box", "teacher_transfer", "universal", "noise", "square",
    }  # fmt: skip
    names = [measure.name for measure in all_measures()]
    assert len(names) == len(set(names))
    for attack in attacks:
        own = {measure.name for measure in attack.measures}
        for gate in attack.gates:
            assert set(gate.measures) <= own, gate
    # every gate an attack declares has its params.yaml line, and no line is left without one
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml").gates.in_pixels()
    assert set(shipped) == set(known_gates())
