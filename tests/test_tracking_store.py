"""An unusable MLflow store is one line within seconds, naming it: an unreachable server, and
a SQLite store that is a folder, garbage or read-only."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from tasks.tracking_store import check_tracking_store
from tests.test_preflight import _read_only


def _register(params_file: Path, uri: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``medtransfer register`` against ``uri``: its exit status and its stderr (the
    ``tracking_env`` fixture puts the variable back afterwards)."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    status = cli_main(["register", "--params", str(params_file), "-q"])
    return status, capsys.readouterr().err


@pytest.fixture
def tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_URI restored after the test (the helper above sets it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


def test_an_unreachable_tracking_server_fails_within_seconds_in_one_line(
    params_file: Path, tracking_env: None, capsys: pytest.CaptureFixture
) -> None:
    started = time.monotonic()
    status, err = _register(params_file, "http://127.0.0.1:9", capsys)
    assert time.monotonic() - started < 10
    assert status == 2
    assert err.strip().splitlines() == [
        "medtransfer register: error: The MLflow tracking server http://127.0.0.1:9 cannot be "
        "reached (Connection refused within 3 s). Start it, or point mlflow.tracking_uri (or "
        "MLFLOW_TRACKING_URI) at a running server or at sqlite:///mlflow.db."
    ]


@pytest.mark.parametrize(
    ("break_store", "why"),
    [
        (lambda path: path.mkdir(), "is a folder, not a SQLite file"),
        (lambda path: path.write_bytes(b"\x93garbage" * 512), "is not a SQLite database"),
    ],
    ids=["folder", "garbage"],
)
def test_a_broken_sqlite_store_is_one_line_naming_it(
    params_file: Path,
    tracking_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    break_store,
    why: str,
) -> None:
    store = tmp_path / "mlflow.db"
    break_store(store)
    status, err = _register(params_file, f"sqlite:///{store}", capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"medtransfer register: error: The MLflow store {store} {why}")


def test_a_read_only_sqlite_store_is_one_line_naming_it_and_left_unchanged(
    params_file: Path,
    tracking_env: None,
    empty_mlflow_db: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(empty_mlflow_db, store)
    before = store.read_bytes()
    with _read_only(store if os.geteuid() == 0 else store.parent):
        if os.geteuid() != 0:
            store.chmod(0o444)
        status, err = _register(params_file, f"sqlite:///{store}", capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(
        f"medtransfer register: error: The MLflow store {store} cannot be written"
    )
    assert "readonly" in line and "Traceback" not in err
    assert store.read_bytes() == before


def test_a_good_sqlite_store_passes_and_is_left_byte_for_byte(
    empty_mlflow_db: Path, tmp_path: Path
) -> None:
    store = tmp_path / "mlflow #1?.db"  # characters a SQLite URI would read as syntax
    shutil.copy(empty_mlflow_db, store)
    check_tracking_store(f"sqlite:///{store}")
    check_tracking_store(f"sqlite:///{tmp_path / 'new.db'}")  # MLflow creates a missing one
    assert store.read_bytes() == empty_mlflow_db.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow #1?.db"]
