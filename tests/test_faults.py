"""Faults lose nothing and mislabel nothing: I/O faults injected into the Prefect flow.

Each fault is a real state of the file system that refuses a stage's write the same way for
root and for other users (chmod does not stop root): a file standing where the stage needs a
folder, a folder standing where it needs a file. The flow runs on Prefect's test harness with
a temporary MLflow store; nothing of Prefect, MLflow or the file system is mocked.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.states import Failed

from flows.cli import main
from flows.pipeline import STAGE_OPTIONS, is_transient_io_error, medtransfer_pipeline
from tasks import reports
from tasks.config import Params
from tasks.errors import StageIOError
from tests.conftest import REPO
from tests.test_flow import TINY


def _params_file(train_params: Params, tmp_path: Path) -> Path:
    """The test-size flow configuration written to a YAML file."""
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(train_params.with_overrides(TINY).to_dict()))
    return path


def _task_run_counts(expect: str) -> dict[str, int]:
    """How many times each task of the latest flow run ran (1: never retried), from Prefect's
    API, once the task run ``expect`` is there: task runs reach the server as events, which
    a busy machine delivers seconds after the flow has ended."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            (latest,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id]))
            )
            counts = {run.name.rsplit("-", 1)[0]: run.run_count for run in task_runs}
            if expect in counts or time.monotonic() > deadline:
                return counts
            time.sleep(0.5)


def _failed_with(error: BaseException) -> Failed:
    """The state Prefect gives a task run that raised ``error``."""
    return Failed(data=error, message=f"Task run encountered an exception: {error!r}")


def test_only_io_errors_that_a_retry_can_fix_are_retried(tmp_path: Path) -> None:
    folder_file = tmp_path / "reports"
    folder_file.write_text("a file where the reports folder should be")
    with pytest.raises(OSError) as not_a_folder:  # the real error the file system gives
        (folder_file / "metrics.json").write_text("{}")
    assert not_a_folder.value.errno == errno.ENOTDIR
    assert not is_transient_io_error(None, None, _failed_with(not_a_folder.value))
    assert not is_transient_io_error(
        None, None, _failed_with(OSError(errno.ENOSPC, "No space left"))
    )
    # a share that timed out or a device that hiccupped may answer on the next attempt
    assert is_transient_io_error(
        None, None, _failed_with(TimeoutError(errno.ETIMEDOUT, "timed out"))
    )
    assert is_transient_io_error(None, None, _failed_with(OSError(errno.EIO, "Input/output error")))
    assert not is_transient_io_error(None, None, _failed_with(ValueError("a bug, not the disk")))


def test_a_file_in_place_of_the_plots_folder_fails_run_in_one_line_and_the_rerun_resumes(
    prefect_harness, train_params: Params, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params_file = _params_file(train_params, tmp_path)
    plots = Path(train_params.reports_dir) / reports.PLOTS_DIR
    plots.parent.mkdir(parents=True, exist_ok=True)
    plots.write_text("not a folder")

    status = main(["run", "--params", str(params_file), "--quiet"])

    assert status == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medtransfer")]
    assert len(ours) == 1, ours
    # train is the first stage to write there (the training history's plot data)
    assert ours[0].startswith("medtransfer run: error: stage train failed")
    assert str(plots) in ours[0] and "move it away" in ours[0]
    # Retrying would meet the same file: the stage ran once, and the stages before finished.
    counts = _task_run_counts(expect="train")
    assert counts["train"] == 1
    assert counts.get("evaluate", 0) == 0
    assert STAGE_OPTIONS["retries"] > 0  # so the single attempt was a decision, not a default

    plots.unlink()  # the user moves the file away and runs again
    rerun = medtransfer_pipeline(params_file=str(params_file))
    assert rerun["cached"] == ["synthesize", "ingest"]
    assert (plots / "roc.png").is_file()
    assert Path(rerun["package"]["archive"]).is_file()


def test_a_registration_whose_report_cannot_be_written_leaves_no_version_and_rerun_adds_one(
    prefect_harness, train_params: Params, tmp_path: Path
) -> None:
    params_file = _params_file(train_params, tmp_path)
    reports_dir = Path(train_params.reports_dir)
    # The register report is written to a temporary file renamed over it; a folder where the
    # report belongs makes that rename fail after the version exists in the registry.
    blocker = reports.REGISTER.path(reports_dir)
    blocker.mkdir(parents=True)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    name = train_params.registry.model_name

    with pytest.raises(StageIOError, match="stage register failed") as failure:
        medtransfer_pipeline(params_file=str(params_file))
    assert str(blocker) in str(failure.value)
    assert client.search_model_versions(f"name='{name}'") == []
    assert client.search_registered_models(filter_string=f"name='{name}'") == []
    assert blocker.is_dir()  # no report written in its place
    run_id = reports.TRAIN.read(reports_dir)["run_id"]
    assert "registry.version" not in client.get_run(run_id).data.tags  # names no removed version

    shutil.rmtree(blocker)
    rerun = medtransfer_pipeline(params_file=str(params_file))
    assert rerun["cached"] == ["synthesize", "ingest", "train", "evaluate", "robustness"]
    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == [rerun["register"]["version"]]
    assert str(client.get_model_version_by_alias(name, train_params.registry.alias).version) == str(
        versions[0].version
    )
    assert reports.REGISTER.read(reports_dir)["version"] == rerun["register"]["version"]
    assert client.get_run(run_id).data.tags["registry.version"] == f"{name}/{versions[0].version}"


def test_a_stage_command_meeting_a_file_in_place_of_a_folder_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """Outside the flow too: `medtransfer ingest` whose processed folder's parent is a file."""
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "medtransfer"),
            "ingest",
            "--quiet",
            "--params",
            str(REPO / "params.yaml"),
            "-S",
            "data.source=synthetic",
            "-S",
            "data.labels_csv=null",
            "-S",
            f"synthetic.output_dir={tmp_path / 'synthetic'}",
            "-S",
            "synthetic.n_patients=4",
            "-S",
            "synthetic.size=64",
            "-S",
            "data.image_size=32",
            "-S",
            f"data.processed_dir={blocker / 'processed'}",
            "-S",
            f"reports_dir={tmp_path / 'reports'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("medtransfer ingest")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and "stage ingest failed to read or write" in lines[0]
    assert str(blocker) in lines[0]
