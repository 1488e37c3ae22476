"""Triggered retraining: re-ingest a watched DICOM folder, retrain only when the data changed.

``watch_and_retrain`` ingests ``orchestration.watch_folder`` (``data.source`` when null) into
the processed dataset, computes its DVC hash (:func:`tasks.data.dataset.dataset_version`) and
compares it with the version the last successful retraining used. Same hash: it logs that it
skipped and returns. New hash: it runs the whole :func:`~flows.pipeline.medtransfer_pipeline`
as a subflow (so every stage the pipeline has, now or later, runs) and records the version.

Where the last version is kept: a small JSON file, ``<reports_dir>/watch_state.json`` by
default (``orchestration.state_file``), not a Prefect Variable, because

- the embedded Prefect server is ephemeral (DESIGN.md §9): a Variable would be lost with its
  database, and the next check would retrain for nothing;
- the record belongs with the dataset and model it describes: two checkouts of the project
  sharing one Prefect server must not see each other's versions;
- a person can read it, and delete it to force a retraining.

Workers on several machines need ``reports_dir`` on shared storage, as they already need the
processed data and models there.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.pipeline import ingest, run_pipeline, run_stage
from tasks.config import Params, load_params
from tasks.data.dataset import dataset_version
from tasks.digest import shown_version

STATE_FILE_NAME = "watch_state.json"


def watch_source(params: Params) -> str:
    """The source the watch flow ingests: ``orchestration.watch_folder``, else ``data.source``."""
    return params.orchestration.watch_folder or params.data.source


def state_path(params: Params) -> Path:
    """Where the last trained dataset version is recorded (see the module docstring)."""
    configured = params.orchestration.state_file
    return Path(configured) if configured else Path(params.reports_dir) / STATE_FILE_NAME


def read_state(path: Path) -> dict[str, Any]:
    """The recorded state, or ``{}`` when nothing has been trained yet (or the file is unreadable)."""
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, so a crash mid-write never leaves a half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


@task(name="dataset-version")
def processed_version(processed_dir: str) -> str:
    """DVC hash of the processed dataset folder (e.g. ``"3f2a...e1.dir"``)."""
    return dataset_version(processed_dir)


@flow(name="watch-and-retrain", log_prints=True)
def watch_and_retrain(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Re-ingest the watched folder and run the pipeline only if the dataset version changed.

    Args:
        params_file: the parameter file, as for ``medtransfer_pipeline``.
        overrides: ``key=value`` overrides, as for ``medtransfer_pipeline``.

    Returns:
        ``{"retrained": bool, "dataset_version": str, "previous_version": str | None,
        "source": str, "state_file": str}``, plus ``"summary"`` (the pipeline's summary) when
        it retrained.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    params = load_params(params_file, overrides)
    source = watch_source(params)
    params = replace(params, data=replace(params.data, source=source))

    # The pipeline's own cached ingest task: an unchanged folder (same file names, sizes and
    # times) is not decoded again, and the pipeline below reuses this ingestion.
    run_stage(ingest, "ingest", params, cached=[])
    version = processed_version(params.data.processed_dir)
    path = state_path(params)
    previous = read_state(path)
    result: dict[str, Any] = {
        "source": source,
        "dataset_version": version,
        "previous_version": previous.get("dataset_version"),
        "state_file": str(path),
    }
    if previous.get("dataset_version") == version:
        # The watched folder is not named in a log line: a folder's name can carry a
        # patient's; the state file (in the project's reports) names it.
        logger.info(
            "Skipped retraining: dataset version %s of the watched folder is unchanged since "
            "the run of %s (MLflow run %s). State: %s",
            shown_version(version),
            previous.get("trained_at", "?"),
            previous.get("mlflow_run_id", "?"),
            path,
        )
        return {**result, "retrained": False}

    logger.info(
        "Dataset version changed (%s -> %s); running the pipeline on the watched folder",
        shown_version(previous.get("dataset_version") or "none recorded"),
        shown_version(version),
    )
    # The pipeline subflow takes its configuration as Prefect parameters (the file and the
    # override strings its run page shows): the watched folder goes in as one, JSON-quoted so
    # that the path is a YAML string whatever characters it holds.
    source_override = f"data.source={json.dumps(source)}"
    summary = run_pipeline(params_file=params_file, overrides=[*overrides, source_override])
    trained_version = _record_retraining(path, summary, source)
    logger.info(
        "Retrained on dataset version %s; recorded in %s", shown_version(trained_version), path
    )
    return {**result, "dataset_version": trained_version, "retrained": True, "summary": summary}


def _record_retraining(path: Path, summary: dict[str, Any], source: str) -> str:
    """Record in the state file what the pipeline actually trained on (its own ingest may have
    seen files that arrived after the check); returns that dataset version."""
    trained_version = summary["train"]["dataset_version"]
    write_state(
        path,
        {
            "dataset_version": trained_version,
            "source": source,
            "mlflow_run_id": summary["train"].get("run_id"),
            "flow_run_id": str(flow_run.get_id()),
            "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return trained_version


if __name__ == "__main__":
    watch_and_retrain()
