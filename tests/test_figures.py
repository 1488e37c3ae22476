"""The figures that decide (tasks/figures.py): what `dvc metrics show` prints, and the package
stage's "nothing approved" outcome, which ends a pipeline green."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.cli import main
from tasks import reports
from tasks.config import Params
from tasks.figures import evaluation_figures, figures_dir, verdict_figures, write_figures
from tasks.robustness.gates import gate_verdict
from tasks.robustness.result import metric_key


def test_the_evaluation_figures_are_each_test_metric_with_its_interval_over_patients() -> None:
    report = {
        "test": {
            "auc": 0.75,
            "ece": 0.1,
            "n_patients": 9,
            "n_images": 30,
            "ci95": {"auc": {"low": 0.5, "high": 0.9}, "ece": {"low": 0.05, "high": 0.2}},
        }
    }
    figures = evaluation_figures(report)
    assert list(figures) == [
        "test_auc",
        "test_accuracy",
        "test_sensitivity",
        "test_specificity",
        "test_ece",
    ]
    assert figures["test_auc"] == {"estimate": 0.75, "ci_low": 0.5, "ci_up": 0.9, "n": 9}
    assert figures["test_accuracy"] == {"estimate": None, "ci_low": None, "ci_up": None, "n": 9}


def test_each_gate_shows_its_deciding_bound_beside_its_limit_and_the_verdict_as_a_number() -> None:
    key = metric_key("universal_fooling", 1 / 255)
    verdict = gate_verdict(
        {key: 0.2},
        0.85,
        {"min_clean_auc": 0.8, "max_universal_fooling": 0.3, "universal_eps": 1 / 255},
        clean_auc_interval=(0.7, 0.95),
        n_test=40,
    )
    figures = verdict_figures({"passed": verdict.passed, "gates": verdict.gates})
    assert figures["verdict"] == {"passed": 0}
    # a minimum decides on the lower bound, a maximum on the upper
    assert figures["clean_auc"] == {
        "bound": 0.7,
        "limit": 0.8,
        "estimate": 0.85,
        "ci_low": 0.7,
        "ci_up": 0.95,
        "n": 40,
        "passed": 0,
    }
    assert figures["universal_fooling"]["bound"] == 0.2  # no interval given: the estimate
    assert figures["universal_fooling"]["passed"] == 1


def test_writing_figures_replaces_the_folder_so_no_old_figure_is_left(tmp_path: Path) -> None:
    write_figures(tmp_path, "robustness", {"verdict": {"passed": 1}, "gate_old": {"bound": 1}})
    folder = write_figures(tmp_path, "robustness", {"verdict": {"passed": 0}})
    assert folder == figures_dir(tmp_path, "robustness")
    assert sorted(p.name for p in folder.iterdir()) == ["verdict.json"]
    assert json.loads((folder / "verdict.json").read_text()) == {"passed": 0}


def test_package_with_nothing_approved_ends_green_and_says_how_to_build_the_version_anyway(
    params: Params, fresh_mlflow_store: str, tmp_path: Path, capsys
) -> None:
    reason = "clean AUC is 0.571 (95% CI 0.333-0.875, n=13): its lower bound is below 0.8"
    reports.REGISTER.write(params.reports_dir, {"version": "3", "reasons": [reason]})
    settings = params.with_overrides([f"serving.export_dir={tmp_path / 'bentos'}"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))

    assert main(["package", "--params", str(params_file)]) == 0
    printed = capsys.readouterr().out
    assert f"stopped by: {reason}" in printed
    assert "next: to build version 3 anyway (no approval implied): " in printed
    assert printed.rstrip().endswith("medtransfer package -S registry.version=3")
    written = reports.PACKAGE.read(params.reports_dir)
    assert written["built"] is False and written["archive"] is None
    assert (tmp_path / "bentos").is_dir()  # the stage's DVC outputs exist, empty


def test_package_of_a_version_the_registry_does_not_hold_is_one_line_naming_it(
    params: Params, fresh_mlflow_store: str, tmp_path: Path, capsys
) -> None:
    settings = params.with_overrides([f"serving.export_dir={tmp_path / 'bentos'}"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))

    assert main(["package", "--params", str(params_file), "-S", "registry.version=7"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"The registry has no version 7 of {params.registry.model_name!r}." in error
    assert len(error.splitlines()) == 1


def test_per_budget_robustness_goes_to_mlflow_as_one_curve_per_attack_with_the_budget_as_step(
    params: Params, fresh_mlflow_store: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from tasks.tracking.configure import configure_mlflow
    from tasks.tracking.robustness_run import log_robustness

    configure_mlflow(params)
    client = MlflowClient(fresh_mlflow_store)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    run_id = client.create_run(experiment.experiment_id).info.run_id
    reports.TRAIN.write(params.reports_dir, {"run_id": run_id})
    plot = tmp_path / "robustness.png"
    plot.write_bytes(b"png")
    report = {
        "metrics": {
            "clean_acc": 0.8,
            "robust_acc_apgd_eps_0.0020": 0.25,  # 0.5/255: step 5
            "robust_acc_apgd_eps_0.0039": 0.0,  # 1/255: step 10
            "universal_fooling_eps_0.0314": float("nan"),  # undefined: not logged
        },
        "reference_probe": {"metrics": {"noise_acc_eps_0.0039": 0.5}},
        "verdict": {"passed": False},
        "strategies": [],
    }
    log_robustness(params, report, plot)

    def curve(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]

    assert sorted(curve("robustness/robust_acc_apgd")) == [(5, 0.25), (10, 0.0)]
    assert curve("robustness/probe_noise_acc") == [(10, 0.5)]
    logged = client.get_run(run_id).data.metrics
    assert logged["clean_acc"] == 0.8
    assert not [name for name in logged if "_eps_" in name or name.endswith("_ci_low")]
    assert not [name for name in logged if "universal" in name]


def test_a_bento_of_a_version_without_the_alias_is_marked_not_approved_in_words() -> None:
    from types import SimpleNamespace

    from tasks.registry.bento import approval

    champion = SimpleNamespace(version="2", aliases=["champion"], tags={})
    assert approval(champion, "champion") == (
        True,
        "approved: version 2 carries the alias 'champion'",
    )
    failed = SimpleNamespace(
        version="1", aliases=[], tags={"robustness_passed": "false", "promotion": "not_promoted"}
    )
    approved, words = approval(failed, "champion")
    assert approved is False
    assert words == (
        "NOT APPROVED: version 1 does not carry the alias 'champion' (robustness gates failed, "
        "promotion not_promoted); built on request with registry.version, for trials only, "
        "not for patient care"
    )
