"""Scheduled and triggered runs: the Prefect deployments of medtransfer.

Two deployments, configured by the ``orchestration`` section of ``params.yaml``:

- ``medtransfer/scheduled-retrain``: the whole pipeline
  (:func:`~flows.pipeline.medtransfer_pipeline`) on the cron ``orchestration.retrain_cron``;
- ``watch-and-retrain/watch-folder``: :func:`~flows.watch.watch_and_retrain` on
  ``orchestration.watch_cron``, which re-ingests the watched folder and retrains only when the
  dataset's DVC hash changed. At most one of its runs at a time, so two checks never train
  the same data twice.

Both carry the parameter file (as an absolute path) and the ``-S`` overrides they were created
with, so a scheduled run uses exactly the configuration the user served.

Two ways to run them (README, "Schedule retraining"):

- ``medtransfer serve-deployments`` (or ``python -m flows.deployments``): this process
  registers the deployments with the Prefect API (``PREFECT_API_URL``) and runs their flow
  runs itself, until stopped;
- ``medtransfer deploy --work-pool gpu``: registers them with a work pool; a
  ``prefect worker start --pool gpu`` on the machine that should train (a GPU box) runs them,
  in the project folder.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import Params, load_params
from tasks.errors import MedtransferError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

RETRAIN_DEPLOYMENT = "scheduled-retrain"
MONITOR_DEPLOYMENT = "serving-drift"
WATCH_DEPLOYMENT = "watch-folder"


def cron_schedules(cron: str | None, timezone: str, key: str) -> list[Schedule]:
    """One Prefect cron schedule, or none for a null cron.

    Raises:
        MedtransferError: the cron string or the time zone is invalid (named by ``key``).
    """
    from prefect.schedules import Cron

    if not cron:
        return []
    try:
        return [Cron(str(cron), timezone=timezone)]
    except ValueError as err:
        raise MedtransferError(
            f"orchestration.{key} {cron!r} (timezone {timezone!r}) is not a valid cron "
            f"schedule: {err}"
        ) from err


def build_deployments(
    params: Params,
    params_file: str | Path,
    overrides: Sequence[str] = (),
    *,
    work_pool_name: str | None = None,
    working_dir: str | Path | None = None,
) -> list[RunnerDeployment]:
    """The retrain and watch deployments, not yet registered with any API.

    Args:
        params: the loaded parameters (``params_file`` with ``overrides``): the crons come from
            their ``orchestration`` section.
        params_file: baked into each deployment's parameters, made absolute so that a run
            started elsewhere reads the same file.
        overrides: the ``-S`` overrides, baked into each deployment's parameters.
        work_pool_name: register for this work pool (``deploy``); ``None`` to ``serve``.
        working_dir: a work-pool run's working folder, where the relative paths of
            params.yaml point (default: the current folder).

    Returns:
        ``[retrain, watch]`` as Prefect ``RunnerDeployment`` objects.
    """
    from flows.fanout import flow_task_runner
    from flows.pipeline import medtransfer_pipeline
    from flows.watch import watch_and_retrain

    config = params.orchestration
    parameters: dict[str, Any] = {
        "params_file": str(Path(params_file).resolve()),
        "overrides": list(overrides),
    }
    pool = _pool_settings(work_pool_name, working_dir)
    # The flows run on the task runner the configuration names (the ingest maps decoding on
    # it). A work pool's worker imports the decorated flow instead: its default thread pool.
    runner = flow_task_runner(params)
    retrain = medtransfer_pipeline.with_options(task_runner=runner).to_deployment(
        name=RETRAIN_DEPLOYMENT,
        schedules=cron_schedules(config.retrain_cron, config.timezone, "retrain_cron"),
        parameters=parameters,
        description="Retrain, evaluate and check the student on the configured data.",
        tags=["medtransfer", "retrain"],
        **pool,
    )
    watch = watch_and_retrain.with_options(task_runner=runner).to_deployment(
        name=WATCH_DEPLOYMENT,
        schedules=cron_schedules(config.watch_cron, config.timezone, "watch_cron"),
        parameters=parameters,
        description="Re-ingest the watched folder; retrain only when its dataset version changed.",
        tags=["medtransfer", "watch"],
        concurrency_limit=1,
        **pool,
    )
    return [retrain, watch]


def _pool_settings(work_pool_name: str | None, working_dir: str | Path | None) -> dict[str, Any]:
    """``to_deployment`` settings for a work pool (none to ``serve``)."""
    from prefect.types.entrypoint import EntrypointType

    if not work_pool_name:
        return {}
    # A worker imports the flow by module name (the project is pip-installed where it runs)
    # and starts it in the project folder, where params.yaml's relative paths live.
    return {
        "work_pool_name": work_pool_name,
        "entrypoint_type": EntrypointType.MODULE_PATH,
        "job_variables": {"working_dir": str(Path(working_dir or Path.cwd()).resolve())},
    }


def monitor_deployments(
    params: Params, params_file: str | Path, overrides: Sequence[str] = (), **pool: Any
) -> list[RunnerDeployment]:
    """``monitor/serving-drift``: ``medtransfer monitor`` on the cron ``monitor.cron`` (none
    when it is null)."""
    from flows.monitor import monitor_flow

    if not params.monitor.cron:
        return []
    return [
        monitor_flow.to_deployment(
            name=MONITOR_DEPLOYMENT,
            schedules=cron_schedules(params.monitor.cron, params.orchestration.timezone, "cron"),
            parameters={
                "params_file": str(Path(params_file).resolve()),
                "overrides": list(overrides),
            },
            description="Compare the service's recent requests with the training profile.",
            tags=["medtransfer", "monitor"],
            concurrency_limit=1,
            **pool,
        )
    ]


def serve_deployments(
    params_file: str | Path = "params.yaml", overrides: Sequence[str] = ()
) -> None:
    """Register both deployments with the Prefect API and run their flow runs here.

    Blocks until interrupted (Ctrl-C or SIGTERM); the schedules are paused on the way out,
    as Prefect does for served deployments.
    """
    from prefect import serve

    params = load_params(params_file, overrides)
    serve(
        *build_deployments(params, params_file, overrides),
        *monitor_deployments(params, params_file, overrides),
    )


def deploy_deployments(
    work_pool_name: str,
    params_file: str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    working_dir: str | Path | None = None,
) -> list[str]:
    """Register both deployments with an existing work pool; returns their ids.

    Raises:
        MedtransferError: the work pool does not exist (create it with
            ``prefect work-pool create --type process NAME``).
    """
    from prefect import deploy

    params = load_params(params_file, overrides)
    deployments = build_deployments(
        params, params_file, overrides, work_pool_name=work_pool_name, working_dir=working_dir
    ) + monitor_deployments(
        params, params_file, overrides, **_pool_settings(work_pool_name, working_dir)
    )
    try:
        # Prefect prints its table of deployments: to stderr, with the progress, so that
        # stdout is the command's own summary (its JSON with --json).
        with contextlib.redirect_stdout(sys.stderr):
            ids = deploy(*deployments, work_pool_name=work_pool_name, ignore_warnings=True)
    except ValueError as err:
        raise MedtransferError(
            f"{err} Create it with `prefect work-pool create --type process {work_pool_name}`."
            if "Could not find work pool" in str(err)
            else str(err)
        ) from err
    return [str(i) for i in ids]


if __name__ == "__main__":
    serve_deployments()
