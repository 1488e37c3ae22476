"""MLflow set-up shared by the stages that log: the store and experiment, the dataset as MLflow
sees it, the logged model's requirements and the model a run logged."""

from __future__ import annotations

import os
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.data

from tasks.config import Params
from tasks.tracking_store import check_tracking_store

# The experiment tag the MLflow UI reads to choose its layout (mlflow/server/js: without it the
# UI infers the kind and opened medtransfer's experiment on the empty GenAI trace overview).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5  # CPU, memory, disk and GPU sampled into each training run
# The name of the student each training run logs (its page in the run's Models list); runs
# logged before it had a name of its own call it "model" (LEGACY_MODEL_NAME).
MODEL_NAME = "student_classifier"
LEGACY_MODEL_NAME = "model"
MAX_DIGEST = 36  # MLflow's dataset digest column (DVC's "<md5>.dir" is exactly 36)


# The drift monitor's runs go to their own experiment, ``<mlflow.experiment>-monitor``, not
# among the training runs.
MONITOR_SUFFIX = "-monitor"


def configure_mlflow(params: Params, suffix: str = "") -> str:
    """Point MLflow at the configured store and experiment (``mlflow.experiment`` plus
    ``suffix``, e.g. :data:`MONITOR_SUFFIX`); returns the experiment id.

    ``MLFLOW_TRACKING_URI`` in the environment wins over ``mlflow.tracking_uri`` so that a test
    or a CI job can redirect every stage without editing params.yaml. The experiment is marked
    as model training (:data:`EXPERIMENT_KIND_TAG`), so the UI opens on its runs.
    """
    section = params.mlflow
    uri = os.environ.get("MLFLOW_TRACKING_URI") or section.tracking_uri
    check_tracking_store(uri)  # seconds and one line, not minutes of retries or a traceback
    mlflow.set_tracking_uri(uri)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    name = section.experiment + suffix
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before medtransfer set it
            mlflow.MlflowClient().set_experiment_tag(
                experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id
    experiment_id = mlflow.create_experiment(
        name, artifact_location=artifact_location(uri, section.artifact_root),
        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
    )  # fmt: skip
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def artifact_location(tracking_uri: str, artifact_root: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``MEDTRANSFER_ARTIFACT_ROOT`` if set; on a
    tracking server (http/https) None, the server's own store (``mlflow server
    --artifacts-destination``, reached through it as ``mlflow-artifacts:/``), so that every
    client writes where the server reads; else ``artifact_root`` as a file URI."""
    artifacts = os.environ.get("MEDTRANSFER_ARTIFACT_ROOT")
    if not artifacts and tracking_uri.lower().startswith(("http://", "https://")):
        return None
    artifacts = artifacts or artifact_root
    return artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()


def mlflow_dataset(dataset, version: str):
    """The processed dataset (:class:`tasks.data.dataset.ProcessedDataset`) as an MLflow
    dataset: images ``(N, S, S)`` uint8 and labels ``(N,)``, named by ``data.name``, the
    processed folder as its source and its DVC version (:func:`tasks.data.dataset.dataset_version`) as its digest, so
    runs on the same data show the same digest. No pixel value is stored, only the schema and
    the shape."""
    source = dataset.source
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice and says so on every resolve
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return mlflow.data.from_numpy(
            dataset.images,
            targets=dataset.labels,
            source=Path(dataset.root).resolve().as_uri(),
            name=source.name,  # the user's label (data.name), never a path
            digest=version[:MAX_DIGEST] or None,
        )


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to this environment: what loading its
    ``pt2`` program needs (torch, numpy)."""
    return [f"{name}=={version(name)}" for name in ("torch", "numpy")]


def logged_model_id(run_id: str, name: str = MODEL_NAME) -> str | None:
    """The id of the model named ``name`` that run ``run_id`` logged (MLflow 3's LoggedModel),
    or ``None`` when it logged none."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs is not None else []:
        if client.get_logged_model(output.model_id).name == name:
            return output.model_id
    return None
