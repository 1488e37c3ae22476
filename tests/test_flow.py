"""The Prefect flow end to end at test size: every stage, then a re-run that is all cache hits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import medtransfer_pipeline
from tasks.config import Params

TINY = [
    "train.epochs=1",
    "robustness.max_samples=6",
    "robustness.epsilons_255=[1]",
    "robustness.pgd_steps=1",
    "robustness.reference_probe=false",
    "robustness.apgd_steps=2",
    "robustness.universal_images=2",
    "robustness.universal_steps=1",
    # A one-epoch student is no good; the gates are not under test here, the flow is.
    "gates.min_clean_auc=null",
    "gates.max_teacher_transfer_success=null",
    "gates.max_universal_fooling=null",
]


def test_flow_runs_every_stage_then_hits_the_cache(
    prefect_harness, train_params: Params, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    params_file = tmp_path / "flow.yaml"
    params_file.write_text(yaml.safe_dump(train_params.with_overrides(TINY).to_dict()))
    reports = Path(train_params.reports_dir)

    # `medtransfer run --quiet`: no progress bar at all, neither ours (ingest, train, attacks)
    # nor a library's (MLflow's artifact downloads)
    first = medtransfer_pipeline(params_file=str(params_file), progress=False)
    bars = re.findall(r".*\[\d\d:\d\d(?:<|, ).*", capfd.readouterr().err)
    assert bars == []
    assert first["cached"] == []
    assert first["ingest"] == json.loads((reports / "ingest.json").read_text())
    assert (
        first["evaluate"]["test"]["auc"]
        == json.loads((reports / "metrics.json").read_text())["test"]["auc"]
    )
    assert first["robustness"]["verdict"]["passed"] is True
    assert first["register"]["alias_moved"] is True
    assert Path(first["package"]["archive"]).is_file()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("medtransfer")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    _check_artifacts(first)

    second = medtransfer_pipeline(params_file=str(params_file))
    # the synthetic source: its generation is a task of its own, cached like the others
    assert second["cached"] == [
        "synthesize",
        "ingest",
        "train",
        "evaluate",
        "robustness",
        "register",
        "package",
    ]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # nothing trained again
    assert second["train"]["run_id"] == first["train"]["run_id"]

    # A changed parameter of one stage recomputes that stage and those after it, not before.
    third = medtransfer_pipeline(params_file=str(params_file), overrides=["eval.threshold=0.5"])
    assert third["cached"] == ["synthesize", "ingest", "train"]
    assert third["evaluate"]["threshold"] == 0.5


def _check_artifacts(summary: dict) -> None:
    """The flow run's Prefect artifacts: the metrics and robustness tables, and the links to
    the MLflow run and the registry version."""
    from prefect.artifacts import Artifact

    metrics = json.loads(Artifact.get("medtransfer-metrics").data)
    assert [row["split"] for row in metrics] == ["val", "test"]
    assert metrics[1]["auc"] == summary["evaluate"]["test"]["auc"]
    robustness = {
        row["epsilon"]: row for row in json.loads(Artifact.get("medtransfer-robustness").data)
    }
    pgd = summary["robustness"]["metrics"]["robust_acc_pgd_eps_0.0039"]  # epsilons_255=[1]
    assert robustness["0.0039"]["robust_acc_pgd"] == pgd
    run_id = summary["train"]["run_id"]
    assert Artifact.get("medtransfer-mlflow-run").data == (
        f"[MLflow run {run_id}](http://127.0.0.1:5000/#/runs/{run_id}"
        "?workflowType=machine_learning)"
    )
    assert Artifact.get("medtransfer-registry-version").data == (
        "[medtransfer-student version 1]"
        "(http://127.0.0.1:5000/#/models/medtransfer-student/versions/1)"
    )
