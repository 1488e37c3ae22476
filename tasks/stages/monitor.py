"""``medtransfer monitor``: the served requests against the training profile.

Reads the latest ``monitor.window`` rows of the service's request store
(``serving.monitor_store``, :mod:`tasks.model.request_store`) and the profile packaging recorded
(``<reports_dir>/serving_profile/profile.json``), compares them (:mod:`tasks.monitoring.drift`),
writes ``<reports_dir>/monitor.json`` and ``plots/monitor.png`` and logs both to MLflow (run
``monitor`` in the experiment ``<mlflow.experiment>-monitor``, apart from the training runs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks import reports
from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.model.profile import PROFILE_FILE, DataProfile
from tasks.model.request_store import read_recent
from tasks.monitoring.drift import compare
from tasks.monitoring.plots import plot_drift

logger = logging.getLogger(__name__)
PROFILE_DIR = "serving_profile"  # tasks.stages.package.SERVING_PROFILE_DIR


def run_monitor(params: Params) -> dict:
    """Compare the recent requests with the training profile; write and log the report.

    Raises:
        MedtransferError: no recorded profile (run ``medtransfer package``) or no request store.
    """
    folder = Path(params.reports_dir) / PROFILE_DIR
    profile = DataProfile.load(folder)
    if profile is None:
        raise MedtransferError(
            f"{folder / PROFILE_FILE} is missing: run `medtransfer package` first (it records "
            "the training data's profile the monitor compares with)."
        )
    store = Path(params.serving.monitor_store)
    if not store.is_file():
        raise MedtransferError(
            f"{store} does not exist: the service writes it (serving.monitor_store, relative to "
            "where `bentoml serve` runs); point -S serving.monitor_store=... at it."
        )
    rows = read_recent(store, params.monitor.window)
    report = compare(rows, profile, params)
    reports.MONITOR.write(params.reports_dir, report)
    plot = plot_drift(report, reports.plot_path(params.reports_dir, "monitor.png"))
    _log_to_mlflow(params, report, plot)
    logger.info(
        "monitor: %d requests, drift: %s", report["n"], ", ".join(report["drifted"]) or "none"
    )
    return report


def _log_to_mlflow(params: Params, report: dict, plot: Path) -> None:
    import mlflow  # deferred: MLflow takes seconds to import, and only this step logs

    # deferred with MLflow, which it imports
    from tasks.tracking.configure import MONITOR_SUFFIX, configure_mlflow

    configure_mlflow(params, suffix=MONITOR_SUFFIX)
    metrics = {f"psi_{k}": v for k, v in report["psi"].items() if np.isfinite(v)}
    metrics["abstention_share"] = report["abstention_share"] if report["n"] else 0.0
    metrics["requests"] = report["n"]
    with mlflow.start_run(run_name="monitor", tags={"stage": "monitor"}):
        mlflow.log_metrics(metrics)
        mlflow.set_tag("drift", str(report["drift"]).lower())
        mlflow.log_artifact(str(plot))
