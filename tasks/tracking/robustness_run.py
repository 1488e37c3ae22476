"""The robustness stage's record in MLflow: its metrics, plot, report and verdict logged onto
the run that trained the student (and the per-strategy table onto a comparison's parent run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks import reports
from tasks.config import Params
from tasks.robustness.result import EPS_SEPARATOR

# Per-budget figures are one MLflow metric per attack with the budget as its step, so MLflow
# charts each attack as a curve. Steps are integers: the budget in tenths of 1/255 (0.5/255 is
# step 5, 8/255 step 80). The intervals are in the robustness plot and report, not metrics.
CURVE_PREFIX = "robustness/"
STEPS_PER_255 = 10


def curve_points(metrics: dict, prefix: str = "") -> list[tuple[str, float, int]]:
    """``(metric name, value, step)`` to log for the robustness report's ``metrics``
    (``<measure>_eps_<budget>``): ``robustness/<prefix><measure>`` at step budget x 2550;
    a metric without a budget (``clean_acc``) is logged at step 0 under its own name.
    Undefined (None, NaN) values are left out."""
    points = []
    for key, value in sorted(metrics.items()):
        if value is None or not np.isfinite(value):
            continue
        measure, separator, eps = key.rpartition(EPS_SEPARATOR)
        if not separator:
            points.append((f"{prefix}{key}", float(value), 0))
            continue
        step = round(float(eps) * 255 * STEPS_PER_255)
        points.append((f"{CURVE_PREFIX}{prefix}{measure}", float(value), step))
    return points


def log_robustness(params: Params, report: dict, plot: Path) -> None:
    """Metrics, plot, report and verdict onto the MLflow run that trained the student."""
    # Deferred: MLflow (and the tracking module over it) is a heavy import that only
    # logging needs; the robustness stage imports this module at its top.
    import mlflow

    from tasks.tracking.configure import configure_mlflow, logged_model_id

    trained = reports.TRAIN.read_if_present(params.reports_dir) or {}
    if not trained.get("run_id"):
        return
    configure_mlflow(params)
    probe = (report.get("reference_probe") or {}).get("metrics") or {}
    with mlflow.start_run(run_id=trained["run_id"]):
        model_id = logged_model_id(trained["run_id"])  # the model page shows what is linked
        for name, value, step in [*curve_points(report["metrics"]), *curve_points(probe, "probe_")]:
            mlflow.log_metric(name, value, step=step, model_id=model_id)
        mlflow.log_artifact(str(plot), artifact_path="robustness")
        mlflow.log_dict(report, "robustness/robustness.json")
        mlflow.set_tag("robustness_verdict", "pass" if report["verdict"]["passed"] else "fail")
    if report["strategies"] and trained.get("parent_run_id"):
        with mlflow.start_run(run_id=trained["parent_run_id"]):
            rows = report["strategies"]
            mlflow.log_table(
                {key: [row[key] for row in rows] for key in rows[0]}, "robustness_by_strategy.json"
            )
