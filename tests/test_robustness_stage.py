"""The robustness stage on a trained (tiny) student: report, verdict, MLflow, DVC metrics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.config import GatesParams, Params
from tasks.robustness.result import metric_key
from tasks.stages.robustness import run_robustness
from tasks.stages.train import run_train
from tasks.tracking.configure import logged_model_id


@pytest.fixture
def robust_params(train_params: Params) -> dict:
    params = train_params.with_overrides(
        [
            "train.epochs=1",
            "robustness.max_samples=12",
            "robustness.epsilons_255=[1,8]",
            "robustness.pgd_steps=2",
            "robustness.apgd_steps=3",
            "robustness.universal_images=4",
            "robustness.universal_steps=2",
            "robustness.reference_probe_steps=30",
            "gates.universal_eps_255=1",
        ],
    )
    run_train(params)
    return params


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
    assert len(report["clean_test_auc_ci95"]) == 2
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
    assert metric_key("robust_acc_pgd", 1 / 255) in run.data.metrics
    # linked to the logged student, so the MLflow model page shows them
    model = MlflowClient().get_logged_model(logged_model_id(run_id))
    linked = {m.key: m.value for m in model.metrics or []}
    key = metric_key("robust_acc_pgd", 1 / 255)
    assert linked[key] == metrics[key]
    assert metric_key("robust_acc_apgd", 1 / 255) + "_ci_low" in run.data.metrics

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
    for row in rows.values():
        assert 0.0 <= row["clean_acc"] <= 1.0 and 0.0 <= row["robust_acc_pgd"] <= 1.0
        assert row["robust_acc_apgd"] <= row["robust_acc_pgd"] and row["n_examples"] == 8
