"""The flow's ingest stage on a Dask cluster of separate processes (`dask scheduler` and two
`dask worker` on loopback): the default's dataset byte for byte, and a worker killed while it
decodes costs nothing: its chunks are decoded again elsewhere, none lost, none twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from benchmarks.scale_data import generate
from tasks.config import Params
from tasks.data.file_decoding import split_in_chunks
from tests.scale.services import DaskCluster
from tests.test_fanout import (
    _assert_same_dataset,
    _decode_task_runs,
    _flow_ingest,
    _ingest_with_process_pool,
)

N_FILES = 300  # about 20 chunks of 16 on two workers: several seconds of decoding


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small DICOM files in six transfer syntaxes, labelled by sub-folder."""
    return generate(tmp_path_factory.mktemp("mixed") / "set", N_FILES, size=48)


@pytest.fixture
def folder_params(params: Params, mixed_folder: Path) -> Params:
    return params.with_overrides(
        [f"data.source={mixed_folder}", "data.labels_csv=null", "data.workers=2"]
    )


def _on_cluster(cluster: DaskCluster) -> list[str]:
    return [
        "orchestration.task_runner=dask",
        f"orchestration.dask_address={cluster.address}",
    ]


def test_a_cluster_of_separate_worker_processes_gives_the_default_dataset(
    prefect_harness, folder_params: Params, dask_processes: DaskCluster, tmp_path: Path
) -> None:
    expected = _ingest_with_process_pool(folder_params, tmp_path / "plain")
    report, flow_run_id = _flow_ingest(
        folder_params, tmp_path / "dask", _on_cluster(dask_processes)
    )
    assert report == expected and report["ingested"] == N_FILES
    _assert_same_dataset(tmp_path / "plain/processed", tmp_path / "dask/processed")
    chunks = split_in_chunks(list(range(report["files_seen"])), 2)
    runs = _decode_task_runs(flow_run_id, expected=len(chunks))
    assert len(runs) == len(chunks) and all(run.state.is_completed() for run in runs)


def _kill_a_busy_worker(cluster: DaskCluster, done: threading.Event) -> int | None:
    """SIGKILL the first of the cluster's worker processes seen decoding a chunk; returns its
    PID (None if the ingestion finished first)."""
    from distributed import Client

    with Client(cluster.address, timeout=10) as client:
        while not done.is_set():
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                return pid
            time.sleep(0.02)
    return None


def test_a_worker_killed_mid_ingest_is_survived_and_nothing_is_lost_or_doubled(
    prefect_harness, folder_params: Params, dask_processes: DaskCluster, tmp_path: Path
) -> None:
    expected = _ingest_with_process_pool(folder_params, tmp_path / "plain")
    done, killed = threading.Event(), []
    killer = threading.Thread(
        target=lambda: killed.append(_kill_a_busy_worker(dask_processes, done)), daemon=True
    )
    killer.start()
    try:
        report, _ = _flow_ingest(folder_params, tmp_path / "dask", _on_cluster(dask_processes))
    finally:
        done.set()
        killer.join(timeout=30)
        dask_processes.replace_dead_workers()  # the session's cluster keeps its two
    assert killed and killed[0] is not None, "the ingestion ended before a worker was killed"
    assert report == expected  # every file once: the same counts, splits and quarantine
    assert report["ingested"] + report["quarantined"] == report["files_seen"]
    _assert_same_dataset(tmp_path / "plain/processed", tmp_path / "dask/processed")
