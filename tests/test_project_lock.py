"""One run at a time per project: a second command that writes outputs is refused at once,
with one line naming the first, and the lock dies with its holder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from tasks.config import Params
from tasks.project_lock import lock_path

HOLD_LOCK = """
import sys, time
from tasks.project_lock import project_lock
with project_lock(sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(params: Params):
    """Another process holding the project lock as a ``medtransfer run`` would."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, params.data.processed_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait(timeout=30)


def test_a_second_command_is_refused_at_once_naming_the_running_one(
    params: Params, params_file: Path, holder, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(["ingest", "--params", str(params_file), "-q"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert f"medtransfer run pid {holder.pid} started" in lines[0]
    assert not Path(params.data.processed_dir).exists()  # refused before anything is written


def test_the_lock_is_free_again_once_its_holder_is_killed(
    params: Params, params_file: Path, holder
) -> None:
    holder.kill()
    holder.wait(timeout=30)
    assert cli_main(["ingest", "--params", str(params_file), "-q"]) == 0
    assert Path(params.data.processed_dir, "manifest.csv").is_file()
    assert lock_path(params.data.processed_dir).parent == Path(params.data.processed_dir).parent


def test_a_torchrun_worker_beside_rank_0_shares_its_launchs_lock(
    params: Params, holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.errors import MedtransferError
    from tasks.project_lock import project_lock

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with (
        pytest.raises(MedtransferError, match="still working"),
        project_lock(params.data.processed_dir, "train"),
    ):
        pass
    monkeypatch.setenv("RANK", "1")  # rank 0 of this launch holds it: rank 1 goes on
    with project_lock(params.data.processed_dir, "train") as path:
        assert path == lock_path(params.data.processed_dir)
