"""The flow's ingest stage fans decoding out through Prefect task runners, Dask included.

Each runner must give the dataset the plain ``medtransfer ingest`` process pool gives, byte
for byte, with every file accounted for; the Dask case runs on a real local Dask cluster whose
task stream shows that its workers did the decoding.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows import pipeline
from flows.fanout import flow_task_runner, task_runner_decode_map
from tasks.config import Params
from tasks.data.file_decoding import decode_in_process_pool, split_in_chunks
from tasks.data.synthetic import SyntheticConfig, generate
from tasks.errors import MedtransferError
from tasks.stages.ingest import run_ingest
from tests.processes import environment_without_prefect, run_python

DATASET_FILES = ("images.npy", "labels.npy", "manifest.csv", "quarantine.csv", "dataset.json")


@flow(name="ingest-only")
def ingest_only(params: Params) -> dict:
    """The pipeline's ingest task alone, in a flow of its own."""
    return pipeline.ingest(params)


def ingest_flow(params: Params):
    """``ingest_only`` on the task runner ``params`` configure, as ``medtransfer run`` runs
    the pipeline."""
    return ingest_only.with_options(task_runner=flow_task_runner(params))


@pytest.fixture
def folder_params(params: Params, tmp_path: Path) -> Params:
    """A synthetic DICOM folder with one file that is not DICOM, as a folder source."""
    folder, labels_csv = generate(SyntheticConfig.from_params(params))
    (folder / "readme.txt").write_text("not an image")
    return params.with_overrides([f"data.source={folder}", f"data.labels_csv={labels_csv}"])


def _ingest_with_process_pool(params: Params, out: Path) -> dict:
    plain = params.with_overrides(
        [f"data.processed_dir={out / 'processed'}", f"reports_dir={out / 'reports'}"]
    )
    return run_ingest(plain, progress=False).to_report()


def _flow_ingest(params: Params, out: Path, overrides: list[str]) -> tuple[dict, str]:
    fanned = params.with_overrides(
        [f"data.processed_dir={out / 'processed'}", f"reports_dir={out / 'reports'}", *overrides],
    )
    state = ingest_flow(fanned)(fanned, return_state=True)
    return state.result(), str(state.state_details.flow_run_id)


def _decode_task_runs(flow_run_id: str, expected: int | None = None) -> list:
    """The flow run's ``decode-files`` task runs as the server has them; with ``expected``,
    waits (up to 30 s) until that many are there and completed: task runs reach the server as
    events, a moment after the flow has their results."""
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        decode = [run for run in runs if run.name.startswith("decode-files")]
        done = all(run.state.is_completed() for run in decode) and len(decode) == expected
        if expected is None or done or time.monotonic() > deadline:
            return decode
        time.sleep(0.5)


def _assert_same_dataset(left: Path, right: Path) -> None:
    for name in DATASET_FILES:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_prefect_task_runners_give_the_process_pools_dataset(
    prefect_harness, folder_params: Params, tmp_path: Path, runner: str
) -> None:
    expected = _ingest_with_process_pool(folder_params, tmp_path / "plain")
    filters_before = list(warnings.filters)
    report, flow_run_id = _flow_ingest(
        folder_params, tmp_path / runner, [f"orchestration.task_runner={runner}"]
    )
    # Decoding threads must not leave the process's warning filters changed (nor race on them).
    assert warnings.filters == filters_before

    assert report == expected
    assert report["quarantined_by_reason"]["not_dicom"] == 1
    assert report["ingested"] + report["quarantined"] == report["files_seen"]
    _assert_same_dataset(tmp_path / "plain/processed", tmp_path / runner / "processed")
    workers = folder_params.data.worker_count
    chunks = split_in_chunks(list(range(report["files_seen"])), workers)
    decode_runs = _decode_task_runs(flow_run_id, expected=len(chunks))
    assert len(decode_runs) == len(chunks) > 1
    assert all(run.state.is_completed() for run in decode_runs)


def test_dask_cluster_decodes_the_chunks_and_the_salt_stays_out_of_prefect(
    prefect_harness, folder_params: Params, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    expected = _ingest_with_process_pool(folder_params, tmp_path / "plain")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        report, flow_run_id = _flow_ingest(
            folder_params,
            tmp_path / "dask",
            [
                "orchestration.task_runner=dask",
                f"orchestration.dask_address={cluster.scheduler_address}",
            ],
        )
        worker_addresses = set(cluster.scheduler_info["workers"])

    assert report == expected
    _assert_same_dataset(tmp_path / "plain/processed", tmp_path / "dask/processed")
    decode_runs = _decode_task_runs(flow_run_id, expected=len(stream.data))
    # Every decode-files task run was a task on the cluster, run by one of its workers.
    assert len(stream.data) == len(decode_runs) > 1
    assert {entry["worker"] for entry in stream.data} <= worker_addresses
    # The patient salt travels to the workers as a task argument; Prefect must not record it.
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
    recorded = flow_run.model_dump_json() + "".join(run.model_dump_json() for run in decode_runs)
    assert "test-salt" not in recorded


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unknown_task_runner_is_a_clear_error(params: Params, workers: int) -> None:
    # Refused when the parameters are read, before the flow decodes anything.
    with pytest.raises(MedtransferError, match=r"orchestration\.task_runner must be one of"):
        params.with_overrides(["orchestration.task_runner=spark", f"data.workers={workers}"])


def test_one_worker_decodes_in_the_flows_process_unless_a_cluster_is_named(params: Params) -> None:
    one = params.with_overrides(["data.workers=1"])
    assert task_runner_decode_map(one) is decode_in_process_pool
    remote = one.with_overrides(
        ["orchestration.task_runner=dask", "orchestration.dask_address=tcp://127.0.0.1:8786"]
    )
    assert task_runner_decode_map(remote) is not decode_in_process_pool


def test_worker_processes_report_to_the_flows_temporary_server(
    folder_params: Params, tmp_path: Path
) -> None:
    """`medtransfer run` without PREFECT_API_URL: one temporary server for flow and workers.

    Otherwise every worker process would start a temporary server of its own.
    """
    import yaml

    params_file = tmp_path / "fanout.yaml"
    params_file.write_text(
        yaml.safe_dump(
            folder_params.with_overrides(
                [
                    f"data.processed_dir={tmp_path / 'processed'}",
                    f"reports_dir={tmp_path / 'reports'}",
                    "data.workers=2",
                    "orchestration.task_runner=processes",
                ],
            ).to_dict()
        )
    )
    script = (
        # `flows` first, as in the medtransfer command: its process defaults (a startup
        # timeout for the temporary server that suits a busy machine) precede prefect's import.
        "import flows\n"
        "from tasks.config import load_params\n"
        "from tests.test_fanout import ingest_flow\n"
        "if __name__ == '__main__':\n"
        f"    params = load_params({str(params_file)!r})\n"
        "    report = ingest_flow(params)(params)\n"
        "    print('files_seen', report['files_seen'])\n"
    )
    done = run_python(script, environment_without_prefect(tmp_path / "prefect-home"), 300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "files_seen" in done.stdout
    assert output.count("Starting temporary server") == 1, output


class _Done:
    """A finished future of one chunk (what ``in_window`` needs: ``result()``)."""

    def __init__(self, chunk: list, in_flight: list) -> None:
        self.chunk, self.in_flight = chunk, in_flight

    def result(self) -> list:
        self.in_flight.remove(self)
        return self.chunk


def test_decoding_keeps_a_bounded_window_of_chunks_in_flight_and_the_file_order() -> None:
    from flows.fanout import in_window

    in_flight: list[_Done] = []
    most = []

    def submit(chunk: list) -> _Done:
        in_flight.append(_Done(chunk, in_flight))
        most.append(len(in_flight))
        return in_flight[-1]

    chunks = [[f"f{i}", f"g{i}"] for i in range(50)]
    outcomes = list(in_window(submit, chunks, window=3))
    assert outcomes == [name for chunk in chunks for name in chunk]
    assert max(most) == 3 and len(most) == 50  # each chunk submitted once, 3 at most ahead
