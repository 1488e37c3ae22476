"""What a flow run shows in the Prefect UI besides its summary: tables and links.

Tables: the student's val/test metrics and its robustness by attack budget. Links: the MLflow
run that trained it and the registry version it became. The MLflow links point at the UI of
the tracking server, or, for a local store (``sqlite:///mlflow.db``), at ``mlflow ui`` on its
default address, in the UI's model-training view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from prefect.artifacts import create_link_artifact, create_table_artifact

from tasks.registry.model_card import robustness_table

LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address
TRAINING_VIEW = "workflowType=machine_learning"  # MLflow 3's runs view, not the GenAI one
METRIC_KEYS = ("auc", "accuracy", "sensitivity", "specificity", "ece")


def mlflow_ui(tracking_uri: str) -> str:
    """The MLflow UI's address for a tracking URI: the server itself, or ``mlflow ui``'s
    default for a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else LOCAL_UI


def metrics_rows(evaluate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The evaluate report's ``val`` and ``test`` metrics, one row per split."""
    return [
        {"split": split, **{key: (evaluate.get(split) or {}).get(key) for key in METRIC_KEYS}}
        for split in ("val", "test")
        if evaluate.get(split)
    ]


def robustness_rows(robustness: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The robustness metrics, one row per L-inf budget (``epsilon``, in [0, 1] pixels)."""
    _, rows = robustness_table(robustness.get("metrics") or {})
    return [{"epsilon": eps, **values} for eps, values in rows]


def publish(summary: Mapping[str, Any], tracking_uri: str) -> None:
    """Create the run's table and link artifacts from the stage reports in ``summary``."""
    if summary.get("evaluate"):
        create_table_artifact(
            metrics_rows(summary["evaluate"]),
            key="medtransfer-metrics",
            description=f"Student's metrics at threshold {summary['evaluate'].get('threshold')}",
        )
    if summary.get("robustness"):
        verdict = (summary["robustness"].get("verdict") or {}).get("passed")
        create_table_artifact(
            robustness_rows(summary["robustness"]),
            key="medtransfer-robustness",
            description=f"Robustness by attack budget; verdict {'PASS' if verdict else 'FAIL'}",
        )
    ui = mlflow_ui(tracking_uri)
    run_id = (summary.get("train") or {}).get("run_id")
    if run_id:
        create_link_artifact(
            f"{ui}/#/runs/{run_id}?{TRAINING_VIEW}",
            link_text=f"MLflow run {run_id}",
            key="medtransfer-mlflow-run",
            description="The training run: parameters, curves, dataset, logged model",
        )
    registered = summary.get("register") or {}
    if registered.get("version"):
        name, version = registered["model_name"], registered["version"]
        create_link_artifact(
            f"{ui}/#/models/{quote(name)}/versions/{version}",
            link_text=f"{name} version {version}",
            key="medtransfer-registry-version",
            description="The registry version and its model card",
        )
