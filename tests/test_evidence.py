"""The evidence step (k-NN, LogME, domain distance, the rule), LP-FT's LP stage, cached frozen
features, ``strategy: auto`` in the train stage and ``medtransfer advise``: real teachers, real
MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import Params
from tasks.model.student import build_student
from tasks.stages.train import run_train
from tasks.training.features import fit_linear_head, frozen_features
from tasks.transfer.selection import (
    TapEvidence,
    choose_depth,
    choose_transfer,
    gaussian_kl,
    knn_scores,
    logme,
)

# ------------------------------------------------------------------------------ measures --


def test_knn_leaves_each_image_out_of_its_own_vote() -> None:
    # Pairs of near-identical points with opposite labels, pairs far apart: each image's
    # nearest other image has the other label, so leave-one-out 1-NN is always wrong.
    centres = np.repeat(np.eye(6) * 100, 2, axis=0)
    features = centres + np.random.default_rng(0).normal(0, 0.01, centres.shape)
    labels = np.tile([0, 1], 6)
    votes = knn_scores(features, labels, 2, k=1)
    assert (votes.argmax(1) == labels).mean() == 0.0


def test_gaussian_kl_has_its_closed_form_values() -> None:
    assert gaussian_kl(np.array([1.0]), np.array([1.0]), np.array([0.0]), np.array([1.0])) == 0.5
    value = gaussian_kl(np.array([0.0]), np.array([4.0]), np.array([0.0]), np.array([1.0]))
    assert value == pytest.approx(0.5 * (4 - 1 + np.log(1 / 4)))
    same = gaussian_kl(np.arange(3.0), np.ones(3) * 2, np.arange(3.0), np.ones(3) * 2)
    assert same == 0.0


@pytest.mark.parametrize("dims", [5, 60])  # the N > D and N < D branches
def test_logme_is_the_maximised_evidence_per_image(dims: int) -> None:
    # LogME is max over (alpha, beta) of log N(y | 0, I / beta + F F^T / alpha) / N, averaged
    # over the one-hot targets: a dense grid search over the same Gaussian must agree.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, dims))
    labels = (features[:, 0] + rng.normal(0, 0.5, 40) > 0).astype(int)
    eigenvalues, basis = np.linalg.eigh(features @ features.T)
    grid = np.exp(np.linspace(-6, 6, 241))
    alpha, beta = np.meshgrid(grid, grid, indexing="ij")
    # covariance eigenvalues per grid point: (A, B, N)
    variances = 1 / beta[..., None] + np.maximum(eigenvalues, 0) / alpha[..., None]
    best = []
    for c in (0, 1):
        projected = basis.T @ (labels == c).astype(float)
        log_density = -0.5 * (
            np.log(2 * np.pi * variances).sum(-1) + (projected**2 / variances).sum(-1)
        )
        best.append(log_density.max() / 40)
    assert logme(features, labels) == pytest.approx(np.mean(best), abs=0.01)


# ------------------------------------------------------------------------------ the rule --


def _taps(teacher: str, aucs: list[float], blocks: list[int]) -> list[TapEvidence]:
    names = [f"stage{i + 1}" for i in range(len(aucs) - 1)] + ["top"]
    return [
        TapEvidence(teacher, n, b, (b + 1) / 16, 8, a, a - 0.03, a + 0.03, a, -0.5, 0.1)
        for n, a, b in zip(names, aucs, blocks, strict=True)
    ]


LITE0_BLOCKS = [0, 2, 4, 7, 10, 14, 15, 15]


@pytest.mark.parametrize(
    ("aucs", "expected"),
    [
        # peaks early (stage 2 of 7), degrades after: everything fine-tunes, head first
        ([0.7, 0.9, 0.8, 0.75, 0.7, 0.7, 0.7, 0.7], ("lp_ft", 16)),
        # holds to stage 6 (block 15 of 16): the one block after it
        ([0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.85, 0.8], ("partial", 1)),
        # holds to stage 4 (block 8): the 8 blocks after it
        ([0.6, 0.7, 0.75, 0.9, 0.85, 0.8, 0.8, 0.8], ("partial", 8)),
        # the deepest tap within 0.01 of the best wins (stage 5 over stage 4's 0.905)
        ([0.6, 0.7, 0.75, 0.905, 0.9, 0.8, 0.8, 0.8], ("partial", 5)),
        # separable at the top already: the head alone
        ([0.8, 0.9, 0.9, 0.95, 0.96, 0.97, 0.97, 0.97], ("linear_probe", 0)),
    ],
)
def test_the_depth_rule_unfreezes_what_comes_after_the_best_tap(aucs, expected) -> None:
    strategy, unfreeze, reasons = choose_depth("efficientnet-lite0", _taps("x", aucs, LITE0_BLOCKS))
    assert (strategy, unfreeze) == expected
    assert reasons


def test_the_teacher_with_the_best_knn_auc_wins_and_confidence_follows_its_interval() -> None:
    strong = _taps("efficientnet-lite0", [0.6, 0.7, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8], LITE0_BLOCKS)
    weak = _taps("efficientnet-lite1", [0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], LITE0_BLOCKS)
    decision = choose_transfer({"efficientnet-lite1": weak, "efficientnet-lite0": strong}, 100, 1.0)
    assert (decision.teacher, decision.confidence) == ("efficientnet-lite0", "high")
    assert [r.teacher for r in decision.evidence][:1] == ["efficientnet-lite0"]
    close = _taps("efficientnet-lite1", [0.6, 0.7, 0.89, 0.8, 0.8, 0.8, 0.8, 0.8], LITE0_BLOCKS)
    tight = choose_transfer({"efficientnet-lite1": close, "efficientnet-lite0": strong}, 100, 1.0)
    assert tight.confidence == "low"  # 0.89 lies inside the winner's [0.87, 0.93]


# --------------------------------------------------------------------- features and LP-FT --


def test_cached_features_are_the_students_own_features() -> None:
    student = build_student("efficientnet-lite0", "linear_probe", 2)
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    cached = frozen_features(student, images, torch.device("cpu"))
    with torch.no_grad():
        direct = student.eval().features(torch.from_numpy(images).float()[:, None] / 255.0)
    assert torch.allclose(cached, direct, atol=1e-6)


def test_the_lp_stage_fits_separable_features_exactly() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    features = torch.from_numpy(rng.normal(size=(60, 16)) + labels[:, None] * 3.0).float()
    head = torch.nn.Linear(16, 2)
    loss = fit_linear_head(head, features, labels, None, l2=1e-4)
    assert (head(features).argmax(1).numpy() == labels).all()
    assert loss < 0.05


# ---------------------------------------------------------------------- the stages, slow --


@pytest.mark.slow
def test_strategy_auto_trains_what_the_pilots_chose_and_records_why(
    train_params: Params,
) -> None:
    # ~50 training images: few, so the candidates are the evidence's depth and linear_probe
    params = train_params.with_overrides(
        ["train.strategy=auto", "train.epochs=1", "robustness.pgd_steps=1"]
    )
    report = run_train(params, progress=False)
    auto = report["auto"]
    assert auto["teacher"] == "efficientnet-lite0"  # a fixed teacher: only the strategy is chosen
    assert report["strategy"] == auto["strategy"] == auto["pilots"]["chosen"]["strategy"]
    assert {row["tap"] for row in auto["evidence"]} >= {"stage1", "stage7", "top"}
    pilots = auto["pilots"]["pilots"]
    assert [p["strategy"] for p in pilots][1:] == ["linear_probe"]
    assert all(p["epochs"] == 1 and 0 <= p["val_auc_low"] <= p["val_auc_high"] for p in pilots)
    assert all(p["exposure_n"] > 0 and p["exposure_low"] <= p["exposure_high"] for p in pilots)
    assert auto["data_facts"]["n_train"] == report["n_train"]
    assert len(auto["decision_table"]) == 2 + len(pilots)
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(report["run_id"])
    assert run.data.params["train.strategy"] == auto["strategy"]
    assert run.data.params["train.unfreeze_blocks"] == str(auto["unfreeze_blocks"])
    assert auto["confidence"] == run.data.tags["medtransfer.auto.confidence"]
    assert auto["runner_up"] == run.data.tags["medtransfer.auto.runner_up"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "auto")}
    assert artifacts == {
        "auto/decision.json",
        "auto/evidence.json",
        "auto/evidence.png",
        "auto/pilots.json",
        "auto/decision_table.md",
        "auto/accuracy_vs_exposure.png",
    }


@pytest.mark.slow
def test_a_linear_probe_without_augmentation_trains_its_head_on_cached_features(
    train_params: Params,
) -> None:
    off = [
        f"train.augment.{k}={v}"
        for k, v in [
            ("flip", "false"),
            ("rotate_degrees", 0),
            ("scale", 0),
            ("translate", 0),
            ("contrast_gamma", 0),
            ("noise_std", 0),
        ]
    ]
    report = run_train(train_params.with_overrides(off), progress=False)
    assert report["epochs_run"] == 2
    (checkpoint,) = list((Path(train_params.train.checkpoint_dir)).glob("*/last.pt"))
    state = torch.load(checkpoint, weights_only=True)["model"]
    assert set(state) == {"head.weight", "head.bias"}  # the checkpointed net is the head alone


@pytest.mark.slow
def test_advise_prints_the_ranked_table_and_the_recommendation(
    train_params: Params, capsys: pytest.CaptureFixture
) -> None:
    processed = ["-S", f"data.processed_dir={train_params.data.processed_dir}"]
    assert main(["advise", "-q", *processed]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["teacher", "tap"]
    rows = lines[1 : lines.index("")]
    assert len(rows) == 24  # 3 teachers x (7 stages + top)
    assert {row.split()[0] for row in rows} == {
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
    }
    assert any(line.startswith("recommended: teacher efficientnet-lite") for line in lines)


def test_the_model_card_says_how_auto_chose() -> None:
    from tasks.registry.model_card import CardInputs, render_model_card

    strong = _taps("efficientnet-lite0", [0.6, 0.7, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8], LITE0_BLOCKS)
    weak = _taps("efficientnet-lite1", [0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], LITE0_BLOCKS)
    decision = choose_transfer({"efficientnet-lite1": weak, "efficientnet-lite0": strong}, 100, 1.0)
    inputs = dict(model_name="m", version="1", run_id="r", spec={}, dataset_version="d")
    card = render_model_card(
        CardInputs(
            **inputs,
            ingest={},
            metrics={},
            robustness=None,
            promoted=False,
            alias="champion",
            selection=decision.to_dict(),
        )
    )
    assert "`auto` chose efficientnet-lite0, lp_ft (unfreeze 16 blocks), confidence high" in card
    assert "| efficientnet-lite0 | stage3 | 0.900 [0.870, 0.930] | -0.500 |" in card
    plain = render_model_card(
        CardInputs(**inputs, ingest={}, metrics={}, robustness=None, promoted=False, alias="a")
    )
    assert "How the teacher" not in plain
