"""The robustness stage's record in MLflow: its metrics, plot, report and verdict logged onto
the run that trained the student (and the per-strategy table onto a comparison's parent run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks import reports
from tasks.config import Params


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
    finite = {k: v for k, v in report["metrics"].items() if v is not None and np.isfinite(v)}
    for key, (low, high) in report["intervals"].items():
        if np.isfinite(low) and np.isfinite(high):
            finite[f"{key}_ci_low"], finite[f"{key}_ci_high"] = low, high
    with mlflow.start_run(run_id=trained["run_id"]):
        model_id = logged_model_id(trained["run_id"])  # the model page shows what is linked
        mlflow.log_metrics(finite, model_id=model_id)
        if report["reference_probe"]:
            mlflow.log_metrics(
                {
                    f"probe_{k}": v
                    for k, v in report["reference_probe"]["metrics"].items()
                    if v is not None and np.isfinite(v)
                },
                model_id=model_id,
            )
        mlflow.log_artifact(str(plot), artifact_path="robustness")
        mlflow.log_dict(report, "robustness/robustness.json")
        mlflow.set_tag("robustness_verdict", "pass" if report["verdict"]["passed"] else "fail")
    if report["strategies"] and trained.get("parent_run_id"):
        with mlflow.start_run(run_id=trained["parent_run_id"]):
            rows = report["strategies"]
            mlflow.log_table(
                {key: [row[key] for row in rows] for key in rows[0]}, "robustness_by_strategy.json"
            )
