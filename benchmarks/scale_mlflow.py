"""MLflow search with many runs: a SQLite store against an ``mlflow server`` on PostgreSQL.

The same ``runs`` runs (5 parameters, 5 metrics, 2 tags each, as a training run logs) are
written to each store, then two searches are timed, 5 times each (median): every run at once
(``max_results=runs``) and the MLflow UI's first page (100 runs ordered by a metric, filtered
on another). Part of ``benchmarks/scale.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

REPEATS = 5


def _fill(client, runs: int) -> str:
    from mlflow.entities import Metric, Param, RunTag

    experiment = client.create_experiment("scale")
    now = int(time.time() * 1000)
    for index in range(runs):
        run = client.create_run(experiment, run_name=f"run-{index}")
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(f"m{k}", (index * 7 + k) % 100 / 100, now, 0) for k in range(5)],
            params=[Param(f"p{k}", str(index % (k + 2))) for k in range(5)],
            tags=[
                RunTag("strategy", ("linear_probe", "partial")[index % 2]),
                RunTag("i", str(index)),
            ],
        )
        client.set_terminated(run.info.run_id)
    return experiment


def _timed(search) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.monotonic()
        search()
        times.append(time.monotonic() - started)
    return round(statistics.median(times), 3)


def _measure(uri: str, store: str, runs: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    started = time.monotonic()
    experiment = _fill(client, runs)
    fill_s = round(time.monotonic() - started, 1)
    found = client.search_runs([experiment], max_results=runs)
    assert len(found) == runs, len(found)
    return {
        "bench": "mlflow", "store": store, "runs": runs, "fill_s": fill_s,
        "search_all_s": _timed(lambda: client.search_runs([experiment], max_results=runs)),
        "search_ui_page_s": _timed(lambda: client.search_runs(
            [experiment], "metrics.m1 > 0.2 and tags.strategy = 'partial'",
            order_by=["metrics.m0 DESC"], max_results=100)),
    }  # fmt: skip


@contextlib.contextmanager
def _postgres_server(root: Path) -> Iterator[str]:
    from tests.scale.services import mlflow_server, postgres_server

    with postgres_server() as postgres:
        backend = postgres.create_database("mlflow")
        with mlflow_server(backend, root) as server:
            yield server.uri


def bench_mlflow(work: Path, runs: int) -> list[dict]:
    """One entry per store: fill time and the two searches' median seconds."""
    import os
    import shutil

    root = work / "mlflow"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    load = [round(x, 2) for x in os.getloadavg()]
    entries = [_measure(f"sqlite:///{root / 'mlflow.db'}", "sqlite", runs)]
    with _postgres_server(root) as uri:
        entries.append(_measure(uri, "postgresql-server", runs))
    for entry in entries:
        entry["load_before"] = load
    return entries
