"""The robustness stage on a trained (tiny) student: report, verdict, MLflow, DVC metrics."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.config import GatesParams, Params
from tasks.data.dataset import load_processed
from tasks.model.student_io import STRATEGIES_SUBDIR, load_student
from tasks.robustness.result import metric_key
from tasks.stages.robustness import run_robustness
from tasks.stages.train import run_train
from tasks.tracking.configure import logged_model_id
from tests.conftest import (
    SMALL_TRAINING_FOLDERS,
    copy_trained_project,
    params_in,
    small_training_overrides,
)

# The robustness tests' settings: a one-epoch student, small attacks.
ROBUST_TRAINING = ["train.epochs=1"]
ROBUST_ATTACKS = [
    "robustness.max_samples=12",
    "robustness.epsilons_255=[1,8]",
    "robustness.pgd_steps=2",
    "robustness.apgd_steps=3",
    "robustness.universal_images=4",
    "robustness.universal_steps=2",
    "robustness.reference_probe_steps=30",
    "gates.universal_eps_255=1",
]


def _robust_params_in(root: Path) -> Params:
    return params_in(root).with_overrides(
        [*small_training_overrides(root), *ROBUST_TRAINING, *ROBUST_ATTACKS]
    )


@pytest.fixture(scope="module")
def trained_once(
    tmp_path_factory: pytest.TempPathFactory, small_training_set: Path, empty_mlflow_db: Path
) -> Path:
    """The small set's student trained once for this module, with its own MLflow store, in a
    folder that tests copy (``robust_params``) and never change."""
    root = tmp_path_factory.mktemp("robust-trained")
    for folder in SMALL_TRAINING_FOLDERS:
        shutil.copytree(small_training_set / folder, root / folder)
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("MEDTRANSFER_ARTIFACT_ROOT", str(root / "mlartifacts"))
        run_train(_robust_params_in(root), progress=False)
    return root


@pytest.fixture
def robust_params(trained_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    """A copy of the module's trained project (data, reports, student, MLflow store) in this
    test's folder, with this test's MLflow pointed at the copy."""
    copy_trained_project(trained_once, tmp_path, monkeypatch)
    return _robust_params_in(tmp_path)


def test_report_verdict_and_mlflow(robust_params: Params, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.stages.robustness")
    report = run_robustness(robust_params, progress=False)
    reports = Path(robust_params.reports_dir)
    assert json.loads((reports / "robustness.json").read_text())["verdict"] == report["verdict"]
    assert (reports / "plots" / "robustness.png").stat().st_size > 1000
    metrics = report["metrics"]
    measures = ("robust_acc_apgd", "teacher_transfer_success", "noise_acc", "universal_fooling")
    for measure in measures:
        low, high = report["intervals"][metric_key(measure, 8 / 255)]
        assert low <= metrics[metric_key(measure, 8 / 255)] <= high, measure
    assert report["n_examples"] == 12
    images, labels = _attacked_images(robust_params, 12)
    student, _ = load_student(Path(robust_params.train.model_dir))
    assert metrics["clean_acc"] == _accuracy(student, images, labels)
    low, high = report["clean_test_auc_ci95"]
    assert low <= report["clean_test_auc"] <= high
    # every verdict line states the estimate, its interval and n, or that nothing was measured
    # (the worst-group gate on a test split with no group of eval.min_group_size patients)
    checked = report["verdict"]["checked"]
    assert all("95% CI" in line or "not judged" in line for line in checked)
    assert any("95% CI" in line for line in checked)
    curves = json.loads((reports / "plots" / "robustness_curves.json").read_text())
    assert {row["model"] for row in curves} == {"student", "frozen-teacher probe"}
    assert report["reference_probe"] is not None
    # An 8/255 PGD attack never helps: accuracy under it is at most the clean accuracy.
    assert metrics[metric_key("robust_acc_pgd", 8 / 255)] <= metrics["clean_acc"]

    run_id = json.loads((reports / "train.json").read_text())["run_id"]
    assert report["run_id"] == run_id  # the run judged, so that register can check it
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)
    verdict = "pass" if report["verdict"]["passed"] else "fail"
    assert run.data.tags["robustness_verdict"] == verdict
    # One curve per attack: the budget (tenths of 1/255) is the step, so MLflow draws a curve.
    history = MlflowClient().get_metric_history(run_id, "robustness/robust_acc_pgd")
    curve = {point.step: point.value for point in history}
    assert curve[10] == metrics[metric_key("robust_acc_pgd", 1 / 255)]
    assert curve[80] == metrics[metric_key("robust_acc_pgd", 8 / 255)]
    assert set(curve) <= {0, 10, 80}  # the budgets attacked (0: unperturbed), nothing else
    # no per-budget figure as a flat metric (its interval is the plot's band, not a metric)
    assert not [key for key in run.data.metrics if "_eps_" in key]
    # linked to the logged student, so the MLflow model page shows them
    model = MlflowClient().get_logged_model(logged_model_id(run_id))
    linked = {(m.key, m.step): m.value for m in model.metrics or []}
    assert (
        linked[("robustness/robust_acc_pgd", 80)] == metrics[metric_key("robust_acc_pgd", 8 / 255)]
    )

    # Attack progress: one line per model and budget (the student, then the reference probe).
    budget_lines = [r.getMessage() for r in caplog.records if "/255 on 12 images" in r.getMessage()]
    assert [line.split(" on 12")[0].split("robustness: ")[1] for line in budget_lines] == [
        "student at 1.00/255",
        "student at 8.00/255",
        "frozen-teacher probe at 1.00/255",
        "frozen-teacher probe at 8.00/255",
    ]
    assert any("robustness verdict:" in r.getMessage() for r in caplog.records)


def test_a_failing_gate_is_a_verdict_not_a_crash(robust_params: Params) -> None:
    strict = robust_params.with_overrides(
        ["gates.min_clean_auc=1.01", "robustness.reference_probe=false"]
    )
    report = run_robustness(strict)
    assert report["verdict"]["passed"] is False
    assert any("clean AUC" in reason for reason in report["verdict"]["reasons"])


def test_gate_budgets_are_converted_from_255_units() -> None:
    gates = GatesParams(
        min_clean_auc=None,
        min_worst_group_auc=0.5,
        min_robust_acc=0.5,
        robust_acc_eps_255=2.0,
        max_teacher_transfer_success=None,
        teacher_transfer_eps_255=None,
        max_universal_fooling=0.3,
        universal_eps_255=4.0,
        max_square_success=None,
        square_eps_255=1.0,
    ).in_pixels()
    assert gates == {
        "min_clean_auc": None,
        "min_worst_group_auc": 0.5,
        "min_robust_acc": 0.5,
        "robust_acc_eps": 2 / 255,
        "max_teacher_transfer_success": None,
        "teacher_transfer_eps": None,
        "max_universal_fooling": 0.3,
        "universal_eps": 4 / 255,
        "max_square_success": None,
        "square_eps": 1 / 255,
    }


def test_pgd_training_variant_appears_in_the_strategy_table(train_params: Params) -> None:
    """The mitigation: a plain and a PGD-trained student side by side in one report."""
    params = train_params.with_overrides(
        [
            "train.epochs=1",
            "train.compare=[linear_probe,linear_probe+pgd]",
            "robustness.max_samples=8",
            "robustness.epsilons_255=[1]",
            "robustness.pgd_steps=1",
            "robustness.apgd_steps=2",
            "robustness.universal_images=4",
            "robustness.universal_steps=1",
            "robustness.reference_probe=false",
            "gates.universal_eps_255=1",
        ],
    )
    report = run_train(params)
    assert {r["strategy"] for r in report["runs"]} == {"linear_probe", "linear_probe+pgd"}
    robustness = run_robustness(params)
    rows = {row["strategy"]: row for row in robustness["strategies"]}
    assert set(rows) == {"linear_probe", "linear_probe+pgd"}
    images, labels = _attacked_images(params, 8)
    for name, row in rows.items():
        # Each row's clean accuracy is its own saved student's, on the 8 attacked images.
        student, _ = load_student(Path(params.train.model_dir) / STRATEGIES_SUBDIR / name)
        assert row["clean_acc"] == _accuracy(student, images, labels), name
        assert row["n_examples"] == 8
        assert row["robust_acc_apgd"] <= row["robust_acc_pgd"] <= row["clean_acc"]


def _attacked_images(params: Params, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The ``n`` test images the robustness stage attacks (a seeded draw from the test split,
    sorted), as float pixels in [0, 1], and their labels: written out here, not taken from the
    stage."""
    dataset = load_processed(params.data.processed_dir)
    test = dataset.indices("test")
    chosen = np.sort(np.random.default_rng(params.seed).choice(test, size=n, replace=False))
    pixels = dataset.images[chosen].astype(np.float32)[:, None] / 255.0
    return torch.from_numpy(pixels), dataset.labels[chosen]


def _accuracy(student: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        predicted = student.eval()(images).argmax(dim=1).numpy()
    return float(np.mean(predicted == labels))
