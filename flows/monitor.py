"""The drift monitor as a Prefect flow, for the ``monitor/serving-drift`` deployment."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow


@flow(name="monitor")
def monitor_flow(params_file: str = "params.yaml", overrides: Sequence[str] = ()) -> dict:
    """``medtransfer monitor`` with ``params_file`` and ``-S`` ``overrides``: the report."""
    from tasks.config import load_params
    from tasks.stages.monitor import run_monitor

    return run_monitor(load_params(params_file, list(overrides)))
