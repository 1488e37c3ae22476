"""MLflow set-up shared by the stages that log: tracking URI, experiment, flattened params.

Embedded default: a SQLite store (``mlflow.db``) and a local artifact folder (``mlartifacts/``)
inside the project, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows every run.
A tracking server is configuration: set ``mlflow.tracking_uri`` (or ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.config import Params

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one parameter value


def configure_mlflow(params: Params) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    ``MLFLOW_TRACKING_URI`` in the environment wins over ``mlflow.tracking_uri`` so that a test
    or a CI job can redirect every stage without editing params.yaml.
    """
    import mlflow

    section = params.mlflow
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or section.tracking_uri)
    name = section.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifacts = os.environ.get("MEDTRANSFER_ARTIFACT_ROOT") or section.artifact_root
    location = artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()
    experiment_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat
