"""Prefect at hospital scale: `prefect server start` on PostgreSQL, `medtransfer deploy
--work-pool` to a process work pool, and a `prefect worker` process that runs the
scheduled-retrain and watch-folder deployments. The flow runs, their task runs, logs and
artifacts are read back from that server, and the flow runs' rows from its PostgreSQL database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import yaml
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)

from flows.deployments import RETRAIN_DEPLOYMENT, WATCH_DEPLOYMENT
from flows.watch import state_path
from tasks.config import Params
from tests.processes import log_tail, running
from tests.scale.services import Postgres, PrefectServer
from tests.test_flow import TINY

BIN = Path(sys.executable).parent
POOL = "medtransfer-cpu"
STAGE_TASKS = {"ingest", "train", "evaluate", "robustness", "register", "package"}
PIPELINE_ARTIFACTS = {"medtransfer-metrics", "medtransfer-robustness", "medtransfer-mlflow-run"}


def test_a_process_worker_runs_the_deployments_on_a_postgresql_backed_prefect_server(
    train_params: Params,
    postgres: Postgres,
    prefect_postgres_server: PrefectServer,
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The square attack's 32 images x 20 queries took most of a run's two minutes of attacks.
    params = train_params.with_overrides(
        [*TINY, "robustness.square_max_samples=2", "robustness.square_queries=2"]
    )
    params_file = tmp_path / "flow.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    env = prefect_postgres_server.client_env(tmp_path / "prefect-home")
    with (
        temporary_settings({PREFECT_API_URL: prefect_postgres_server.api_url}),
        get_client(sync_client=True) as client,
    ):
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        # As the README tells a user: from the project folder, then a worker beside it.
        deployed = subprocess.run(
            [str(BIN / "medtransfer"), "deploy", "--work-pool", POOL, "--params",
             str(params_file), "--json", "-q"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        ids = json.loads(deployed.stdout)["deployment_ids"]
        retrain = client.read_deployment_by_name(f"medtransfer/{RETRAIN_DEPLOYMENT}")
        watch = client.read_deployment_by_name(f"watch-and-retrain/{WATCH_DEPLOYMENT}")
        assert {str(retrain.id), str(watch.id)} <= set(ids)
        assert retrain.work_pool_name == watch.work_pool_name == POOL

        worker_log = tmp_path / "worker.log"
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
        with running(worker, worker_log, env, cwd=tmp_path) as process:
            runs = {}
            for name in (
                f"medtransfer/{RETRAIN_DEPLOYMENT}",
                f"watch-and-retrain/{WATCH_DEPLOYMENT}",
            ):
                runs[name] = run_deployment(name, timeout=600, poll_interval=2, as_subflow=False)
                state = runs[name].state
                assert state is not None and state.is_completed(), (
                    f"{name} ended {state}\n{log_tail(worker_log)}"
                )
            assert process.poll() is None, log_tail(worker_log)
        retrain_run, watch_run = runs.values()
        for run in (retrain_run, watch_run):
            assert str(run.id) in worker_log.read_text()  # the worker picked it up
            assert client.read_flow_run(run.id).work_pool_name == POOL
        _check_recorded(client, retrain_run.id, STAGE_TASKS, PIPELINE_ARTIFACTS)
        # The watch run ingests and hashes, then runs the pipeline as a subflow of its own.
        _check_recorded(client, watch_run.id, {"ingest", "dataset-version"}, set())
        (pipeline,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[watch_run.id])
            )
        )
        _check_recorded(client, pipeline.id, STAGE_TASKS, PIPELINE_ARTIFACTS)

        assert "Dataset version changed" in _messages(client, watch_run.id)
        assert "Finished in state Completed()" in _messages(client, retrain_run.id)

    # No state yet, so the watch run retrained (from the pipeline's cache) and recorded it.
    state = json.loads(state_path(params).read_text())
    assert state["flow_run_id"] == str(watch_run.id)
    # The server keeps them in PostgreSQL, not in a SQLite file of its own.
    assert _postgres_states(postgres, [retrain_run.id, watch_run.id]) == ["COMPLETED"] * 2


def _check_recorded(client, flow_run_id: UUID, tasks: set[str], artifacts: set[str]) -> None:
    """The server has the flow run, completed, with task runs of these ``tasks`` (by name, less
    Prefect's ``-<n>`` suffix), its logs, and artifacts of these keys."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    assert client.read_flow_run(flow_run_id).state.is_completed()
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    names = {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert tasks <= names, sorted(names)
    assert all(t.state.is_completed() for t in task_runs), [t.state for t in task_runs]
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert logs and all(log.flow_run_id == flow_run_id for log in logs)
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    assert artifacts <= {a.key for a in found}, sorted(a.key for a in found)


def _messages(client, flow_run_id: UUID) -> str:
    """The flow run's log messages on the server, one a line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _postgres_states(postgres: Postgres, flow_run_ids: list[UUID]) -> list[str]:
    """The ``state_type`` column of these flow runs in the server's PostgreSQL database."""
    import psycopg

    dsn = f"host=127.0.0.1 port={postgres.port} user=medtransfer dbname=prefect"
    with psycopg.connect(dsn) as connection:
        return [
            connection.execute("SELECT state_type FROM flow_run WHERE id = %s", (i,)).fetchone()[0]
            for i in flow_run_ids
        ]
