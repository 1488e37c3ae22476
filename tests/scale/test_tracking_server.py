"""`medtransfer run` against an MLflow tracking server whose store is PostgreSQL: every record a
run makes lands in that server (runs, datasets, the logged model, registry versions, the alias,
the model card, the artifacts in its served store), and `medtransfer package` builds from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import main as cli_main
from tasks.config import Params
from tests.scale.services import MlflowServer
from tests.test_flow import TINY


def test_the_whole_flow_records_everything_on_a_postgresql_backed_tracking_server(
    prefect_harness,
    train_params: Params,
    tracking_server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    monkeypatch.delenv("MEDTRANSFER_ARTIFACT_ROOT")  # the server's store, not a local folder
    params_file = tmp_path / "flow.yaml"
    params_file.write_text(yaml.safe_dump(train_params.with_overrides(TINY).to_dict()))

    assert cli_main(["run", "--params", str(params_file), "-q"]) == 0

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("medtransfer")
    assert experiment.artifact_location == "mlflow-artifacts:/" + experiment.experiment_id
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name != 'x'")
    assert run.info.status == "FINISHED"
    assert [d.dataset.name for d in run.inputs.dataset_inputs]  # the processed dataset
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id
    (version,) = client.search_model_versions("name = 'medtransfer-student'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("medtransfer-student", "champion").version == "1"
    card = version.tags["model_card"]
    assert card.startswith(f"runs:/{run.info.run_id}/model_card/")
    # Artifacts went through the server into its --artifacts-destination, none to a local folder.
    stored = {p.name for p in tracking_server.artifacts.rglob("*") if p.is_file()}
    assert Path(card).name in stored
    assert not (tmp_path / "mlartifacts").exists() and not Path("mlartifacts").exists()

    # `medtransfer package` again, from a clean export folder: it builds from that server.
    export = Path(train_params.serving.export_dir)
    for archive in export.glob("*"):
        archive.unlink()
    assert cli_main(["package", "--params", str(params_file), "-q"]) == 0
    assert [p.name.endswith(".tar.gz") for p in export.iterdir()] == [True]


def test_a_postgresql_store_without_its_driver_is_one_line_naming_the_extra(
    params_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg://mlflow@127.0.0.1:9/mlflow")
    assert cli_main(["register", "--params", str(params_file), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "medtransfer register: error: The PostgreSQL store in mlflow.tracking_uri (or "
        "MLFLOW_TRACKING_URI) needs the psycopg driver, which is not installed: pip install "
        "'medtransfer[postgres]' (and use postgresql+psycopg://...)."
    ]
