"""Scheduled and triggered runs: real Prefect server, real deployments, the real pipeline.

Every pipeline run here is the whole flow on a tiny configuration (12 synthetic patients at
32 px, one epoch, four attacked images at one budget), so it finishes in seconds.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from flows.deployments import (
    RETRAIN_DEPLOYMENT,
    WATCH_DEPLOYMENT,
    build_deployments,
)
from tasks.config import Params
from tasks.data import synthetic
from tasks.errors import MedtransferError
from tests.processes import (
    environment_without_prefect,
    free_port,
    http_ok,
    log_tail,
    running,
    wait_until,
)

BIN = Path(sys.executable).parent
WEEKLY = "0 3 * * 1"  # Mondays 03:00


@pytest.fixture
def tiny_params(params: Params, tmp_path: Path, fresh_mlflow_store: str) -> dict:
    """The whole pipeline at its smallest, every path and the MLflow store in ``tmp_path``."""
    return params.with_overrides(
        [
            "synthetic.n_patients=12",
            "data.image_size=32",
            # decode in this process: spawning workers costs more than 40 small files
            "data.workers=1",
            "train.epochs=1",
            f"train.model_dir={tmp_path / 'models/student'}",
            f"train.checkpoint_dir={tmp_path / 'models/checkpoints'}",
            "eval.gradcam_examples=1",
            "robustness.max_samples=4",
            "robustness.epsilons_255=[1]",
            "robustness.pgd_steps=1",
            "robustness.reference_probe=false",
            "robustness.apgd_steps=2",
            "robustness.universal_images=2",
            "robustness.universal_steps=1",
            # a one-epoch student is no good: the gates would stop it before the registry alias
            # and packaging, which belong to the pipeline under test here
            "gates.min_clean_auc=null",
            "gates.max_teacher_transfer_success=null",
            "gates.max_universal_fooling=null",
            f"serving.bentoml_home={tmp_path / 'bentoml'}",
            f"serving.export_dir={tmp_path / 'bentos'}",
            f"orchestration.retrain_cron={WEEKLY}",
            "orchestration.timezone=UTC",
        ],
    )


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


def mlflow_run_ids(tracking_uri: str) -> list[str]:
    """Ids of the training runs in the ``medtransfer`` experiment of a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("medtransfer")
    if experiment is None:
        return []
    return [run.info.run_id for run in client.search_runs([experiment.experiment_id])]


# --- configuration -----------------------------------------------------------------------


def test_deployments_carry_crons_parameters_and_a_pool(tiny_params: Params, tmp_path: Path) -> None:
    params = tiny_params.with_overrides(
        ["orchestration.watch_cron=null", "orchestration.timezone=Europe/Paris"]
    )
    retrain, watch = build_deployments(
        params, tmp_path / "params.yaml", ["train.epochs=1"], work_pool_name="gpu"
    )
    assert (retrain.flow_name, retrain.name) == ("medtransfer", RETRAIN_DEPLOYMENT)
    assert (watch.flow_name, watch.name) == ("watch-and-retrain", WATCH_DEPLOYMENT)
    [schedule] = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (WEEKLY, "Europe/Paris")
    assert watch.schedules == []  # a null cron: triggered by hand only
    assert retrain.parameters == {
        "params_file": str((tmp_path / "params.yaml").resolve()),
        "overrides": ["train.epochs=1"],
    }
    assert retrain.work_pool_name == watch.work_pool_name == "gpu"
    assert retrain.entrypoint == "flows.pipeline.medtransfer_pipeline"
    assert retrain.job_variables == {"working_dir": str(Path.cwd().resolve())}
    assert watch.concurrency_limit == 1


def test_an_invalid_cron_is_a_clear_error(tiny_params: Params, tmp_path: Path) -> None:
    params = tiny_params.with_overrides(["orchestration.retrain_cron=every monday"])
    with pytest.raises(MedtransferError, match=r"orchestration.retrain_cron 'every monday'"):
        build_deployments(params, tmp_path / "params.yaml")


def test_params_yaml_schedules_weekly_retraining_and_hourly_checks(params: Params) -> None:
    config = params.orchestration
    assert (config.retrain_cron, config.watch_cron, config.timezone) == (
        "0 3 * * 1",
        "0 * * * *",
        "UTC",
    )
    assert params.orchestration.watch_folder is None  # null: data.source


# --- the watch flow -----------------------------------------------------------------------


def copy_patients(source: Path, labels_csv: Path, watched: Path, patients: range) -> int:
    """Copy the synthetic files of ``patients`` into ``watched/<label>/``; returns the count."""
    copied = 0
    with open(labels_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["path"].split("/")[0].removeprefix("case_")) in patients:
                target = watched / row["label"] / row["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / row["path"], target)
                copied += 1
    return copied


def student_weights(model_file: Path) -> dict:
    """The saved student's tensors, read from ``model.pt`` as the service would."""
    import torch

    return torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_watch_and_retrain_trains_skips_then_retrains_on_new_files(
    prefect_harness, tiny_params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flows.watch import read_state, watch_and_retrain

    generated, labels_csv = synthetic.generate(
        synthetic.SyntheticConfig.from_params(
            tiny_params.with_overrides(
                [f"synthetic.output_dir={tmp_path / 'generated'}", "synthetic.n_patients=16"]
            )
        )
    )
    watched = tmp_path / "watched"
    assert copy_patients(generated, labels_csv, watched, range(12)) > 0
    params_file = write_params(
        tiny_params.with_overrides(
            [f"orchestration.watch_folder={watched}", "data.labels_csv=null"]
        ),
        tmp_path / "params.yaml",
    )
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    state_file = Path(tiny_params.reports_dir) / "watch_state.json"

    first = watch_and_retrain(params_file=str(params_file))
    assert first["retrained"] is True
    assert first["previous_version"] is None
    assert first["source"] == str(watched)
    assert Path(first["summary"]["package"]["archive"]).is_file()  # the whole pipeline ran
    state = read_state(state_file)
    assert state["dataset_version"] == first["dataset_version"]
    assert state["mlflow_run_id"] == first["summary"]["train"]["run_id"]
    assert mlflow_run_ids(tracking_uri) == [state["mlflow_run_id"]]

    # Prefect's run loggers do not propagate to the root logger; listen to them directly.
    run_logger = logging.getLogger("prefect.flow_runs")
    run_logger.addHandler(caplog.handler)
    try:
        second = watch_and_retrain(params_file=str(params_file))
    finally:
        run_logger.removeHandler(caplog.handler)
    assert second["retrained"] is False
    assert second["dataset_version"] == second["previous_version"] == first["dataset_version"]
    assert "summary" not in second
    assert "Skipped retraining" in caplog.text
    assert first["dataset_version"].removesuffix(".dir") in caplog.text
    assert mlflow_run_ids(tracking_uri) == [state["mlflow_run_id"]]  # no new training
    assert read_state(state_file) == state

    model_file = Path(tiny_params.train.model_dir) / "model.pt"
    weights_before = student_weights(model_file)
    assert copy_patients(generated, labels_csv, watched, range(12, 16)) > 0
    third = watch_and_retrain(params_file=str(params_file))
    assert third["retrained"] is True
    # The flow resumes checkpoints: new data must start a new training, not resume the
    # finished one and save the same student again.
    weights_after = student_weights(model_file)
    assert weights_after.keys() == weights_before.keys()
    assert any(not weights_after[k].equal(weights_before[k]) for k in weights_before)
    assert third["previous_version"] == first["dataset_version"]
    assert third["dataset_version"] != first["dataset_version"]
    assert read_state(state_file)["dataset_version"] == third["dataset_version"]
    runs = mlflow_run_ids(tracking_uri)
    assert len(runs) == 2 and third["summary"]["train"]["run_id"] in runs


@pytest.mark.slow
def test_the_watch_flow_logs_the_dataset_version_without_dvc_s_dir_suffix(
    prefect_harness, tiny_params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flows.watch import state_path, watch_and_retrain, write_state
    from tasks.data.dataset import dataset_version
    from tasks.stages.ingest import run_ingest

    generated, labels_csv = synthetic.generate(synthetic.SyntheticConfig.from_params(tiny_params))
    watched = tmp_path / "watched"
    assert copy_patients(generated, labels_csv, watched, range(12)) > 0
    params = tiny_params.with_overrides(
        [f"orchestration.watch_folder={watched}", "data.labels_csv=null"]
    )
    # the state of a retraining on exactly this folder, so that the flow only checks and skips
    run_ingest(params.with_overrides([f"data.source={watched}"]), progress=False)
    version = dataset_version(params.data.processed_dir)
    assert version.endswith(".dir")  # DVC's marker on a folder's hash, in the machine's record
    write_state(state_path(params), {"dataset_version": version})

    run_logger = logging.getLogger("prefect.flow_runs")
    run_logger.addHandler(caplog.handler)
    try:
        result = watch_and_retrain(params_file=str(write_params(params, tmp_path / "p.yaml")))
    finally:
        run_logger.removeHandler(caplog.handler)
    assert result["retrained"] is False and result["dataset_version"] == version
    # one line, whichever handlers saw it (the record can reach caplog twice: through the
    # handler added here and by propagation, as under the xdist workers)
    (line,) = {r.getMessage() for r in caplog.records if "Skipped retraining" in r.getMessage()}
    assert f"dataset version {version.removesuffix('.dir')} of the watched folder" in line
    # no log line names the watched folder (a folder's name can carry a patient's)
    assert not [r for r in caplog.records if str(watched) in r.getMessage()]


# --- a scheduled deployment on a real server ----------------------------------------------


@pytest.mark.slow
def test_served_retrain_deployment_is_scheduled_and_runs_the_pipeline(
    tiny_params: Params, tmp_path: Path
) -> None:
    """`prefect server start` + `medtransfer serve-deployments`, as the README tells a user."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params_file = write_params(tiny_params, tmp_path / "params.yaml")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = environment_without_prefect(tmp_path / "prefect-home")
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # schedule the deployment's runs within a second of its creation, not a minute
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    }
    server_log, serve_log = tmp_path / "prefect-server.log", tmp_path / "serve.log"
    server_command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
    with running([*server_command, "--port", str(port)], server_log, env) as server:
        wait_until(lambda: http_ok(f"{api_url}/health"), 120, "prefect server", server, server_log)
        serve_env = env | {"PREFECT_API_URL": api_url}
        serve_command = [
            str(BIN / "medtransfer"),
            "serve-deployments",
            "--params",
            str(params_file),
        ]
        with (
            running(serve_command, serve_log, serve_env, cwd=tmp_path) as served,
            temporary_settings({PREFECT_API_URL: api_url}),
            get_client(sync_client=True) as client,
        ):

            def deployment():
                try:
                    return client.read_deployment_by_name(f"medtransfer/{RETRAIN_DEPLOYMENT}")
                except Exception:  # not registered yet
                    return None

            retrain = wait_until(deployment, 120, "served deployment", served, serve_log)
            assert [(s.schedule.cron, s.schedule.timezone) for s in retrain.schedules] == [
                (WEEKLY, "UTC")
            ]
            assert retrain.parameters["params_file"] == str(params_file.resolve())

            # The server's scheduler turns the cron into upcoming runs: Mondays at 03:00 UTC.
            def upcoming():
                return client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                        )
                    ),
                )

            scheduled = wait_until(upcoming, 60, "scheduled runs", server, server_log)
            for run in scheduled:
                start = run.expected_start_time.astimezone(dt.UTC)
                assert (start.weekday(), start.hour, start.minute) == (0, 3, 0)
                assert start > dt.datetime.now(dt.UTC)

            # One run now, as `prefect deployment run 'medtransfer/scheduled-retrain'` does;
            # the serving process picks it up and runs the pipeline.
            run = run_deployment(
                f"medtransfer/{RETRAIN_DEPLOYMENT}",
                timeout=300,
                poll_interval=2,
                as_subflow=False,
            )
            assert run.state is not None and run.state.is_completed(), (
                f"flow run ended {run.state}\n{log_tail(serve_log)}"
            )
    reports = Path(tiny_params.reports_dir)
    for report in ("ingest.json", "metrics.json", "robustness.json", "register.json"):
        assert (reports / report).is_file(), report
    assert len(mlflow_run_ids(os.environ["MLFLOW_TRACKING_URI"])) == 1
    package = json.loads((reports / "package.json").read_text())
    assert Path(package["archive"]).is_file()  # the Bento of the champion
