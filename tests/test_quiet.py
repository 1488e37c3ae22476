"""``--quiet`` silences the libraries' progress bars too, and Prefect's console lines print
above an open bar (through ``tqdm.write``) instead of through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tasks.training.recorders import quiet_bars
from tests.conftest import REPO


def _download_an_artifact(tmp_path: Path, name: str) -> None:
    """Log one file to a new MLflow run and download it again (MLflow shows a bar for that)."""
    source = tmp_path / f"{name}.txt"
    source.write_text("x")
    experiment = mlflow.get_experiment_by_name("quiet") or mlflow.get_experiment(
        mlflow.create_experiment("quiet", artifact_location=str(tmp_path / "artifacts"))
    )
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_artifact(str(source))
    mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=source.name, dst_path=str(tmp_path / name)
    )


def test_quiet_bars_silences_mlflow_s_download_bar_and_restores_it_after(
    fresh_mlflow_store: str, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    _download_an_artifact(tmp_path, "loud")
    assert "Downloading artifacts" in capfd.readouterr().err  # the control: a bar by default
    with quiet_bars():
        _download_an_artifact(tmp_path, "quiet")
    assert "Downloading artifacts" not in capfd.readouterr().err
    _download_an_artifact(tmp_path, "again")
    assert "Downloading artifacts" in capfd.readouterr().err


# Run in a process of its own: under pytest, stderr is captured, so Prefect's handler does
# not hold the process's real stderr.
PROBE = """
import json, logging, sys
import flows.pipeline  # what `medtransfer run` imports first: Prefect sets up its logging
from flows.cli import bars_above_prefect_lines

root = logging.getLogger()
def handlers():
    return [[type(h).__name__, getattr(h, "stream", None) is sys.stderr] for h in root.handlers]
before = handlers()
with bars_above_prefect_lines():
    inside = handlers()
print(json.dumps([before, inside, handlers()]))
"""


def test_prefect_s_console_lines_go_through_tqdm_while_the_flow_runs_and_come_back_after() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before, inside, after = json.loads(done.stdout.splitlines()[-1])
    assert before == [["PrefectConsoleHandler", True]]
    # the terminal's one handler writes through tqdm.write, above an open bar
    assert inside == [["_TqdmLoggingHandler", True]]
    assert after == before
