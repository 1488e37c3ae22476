"""A stage that cannot write every output refuses before it replaces any: the old dataset and
its old report stay together."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from tasks import reports
from tasks.atomic import PROBE_PREFIX, check_can_write
from tasks.config import Params
from tasks.stages.ingest import run_ingest


def _tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` refuses new files for this user: chmod for others, the immutable attribute
    for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i on this file system: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_reports_dir_refuses_the_second_ingest_and_keeps_the_old_dataset(
    params: Params, params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_ingest(params, progress=False)
    processed, reports_dir = Path(params.data.processed_dir), Path(params.reports_dir)
    dataset_before = _tree_digest(processed)
    report_before = reports.INGEST.path(reports_dir).read_bytes()
    with _read_only(reports_dir):
        # a different dataset would come out (one more patient), if it were allowed to
        status = cli_main(
            ["ingest", "--params", str(params_file), "-q", "-S", "synthetic.n_patients=17"]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("medtransfer ingest: error: stage ingest failed to read or write")
    assert str(reports_dir) in err[-1]
    assert _tree_digest(processed) == dataset_before
    assert reports.INGEST.path(reports_dir).read_bytes() == report_before
    assert not [p for p in reports_dir.iterdir() if p.name.startswith(PROBE_PREFIX)]


def test_a_folder_where_a_file_belongs_and_a_file_where_a_folder_belongs_are_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "report.json").mkdir()
    with pytest.raises(IsADirectoryError) as folder_there:
        check_can_write(files=[tmp_path / "report.json"])
    assert folder_there.value.filename == str(tmp_path / "report.json")
    (tmp_path / "plots").write_text("a file")
    with pytest.raises(NotADirectoryError) as file_there:
        check_can_write(files=[tmp_path / "plots" / "deep" / "roc.png"])
    assert file_there.value.errno == errno.ENOTDIR
    assert file_there.value.filename == str(tmp_path / "plots")
    with pytest.raises(NotADirectoryError):
        check_can_write(folders=[tmp_path / "plots"])
    check_can_write(files=[tmp_path / "new" / "a.json"], folders=[tmp_path / "models"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.json"]
