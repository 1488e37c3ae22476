"""Faults lose nothing and mislabel nothing: outputs are swapped in whole or not at all.

The kill tests run the real ``medtransfer`` command in a temporary project (a copy of
params.yaml, every path relative to it), SIGKILL its process group at seeded points while it
writes, run it again, and compare the result with an uninterrupted run's bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tasks import atomic
from tasks.data.dataset import dataset_version
from tasks.project_lock import LOCK_NAME
from tests.processes import kill_group_when

REPO = Path(__file__).resolve().parent.parent
# Small sets: about a second per uninterrupted run on a 2-core machine.
SMALL = ["synthetic.size=64", "data.image_size=32", "data.workers=1"]


def _project(tmp_path: Path) -> Path:
    """A temporary project: a copy of params.yaml; data/ and reports/ are created beside it."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def _command(subcommand: str, overrides: list[str]) -> list[str]:
    """``medtransfer <subcommand> --quiet -S ...`` run with this interpreter."""
    settings = [part for item in [*SMALL, *overrides] for part in ("-S", item)]
    return [sys.executable, "-m", "flows.cli", subcommand, "--quiet", *settings]


def _environment() -> dict[str, str]:
    """This environment with the repository first on the import path (the code under test)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(root: Path, subcommand: str, overrides: list[str]) -> None:
    """Run the command to its end; fail the test, showing its output, unless it exits 0."""
    done = subprocess.run(
        _command(subcommand, overrides),
        cwd=root,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _kill_when(
    root: Path, subcommand: str, overrides: list[str], ready: Callable[[], bool]
) -> bool:
    """Start the command, SIGKILL its whole process group as soon as ``ready()`` holds.

    Returns whether the kill landed (False: the command had already ended on its own).
    """
    command = _command(subcommand, overrides)
    return kill_group_when(command, root, _environment(), lambda pid: ready(), timeout=60)


def _files_written_since(folder: Path, since_ns: int, suffix: str) -> int:
    """How many files ending in ``suffix`` under ``folder`` were written after ``since_ns``."""
    count = 0
    for path in folder.rglob(f"*{suffix}"):
        with contextlib.suppress(FileNotFoundError):  # a folder being swapped or removed
            if path.stat().st_mtime_ns >= since_ns:
                count += 1
    return count


def _outcome(root: Path) -> dict[str, object]:
    """What a run left: the dataset's version and bytes, the synthetic labels and report."""
    processed = root / "data" / "processed"
    return {
        "dataset_version": dataset_version(processed),
        "images": (processed / "images.npy").read_bytes(),
        "labels_npy": np.load(processed / "labels.npy").tolist(),
        "synthetic_labels": (root / "data" / "synthetic" / "dicom" / "labels.csv").read_text(),
        "report": (root / "reports" / "ingest.json").read_text(),
    }


def test_an_interrupted_larger_regeneration_never_mislabels_the_next_run(tmp_path: Path) -> None:
    """The reported scenario: ingest 30 patients, start 400 and kill it while it writes the
    synthetic set, ingest 30 again. The last run must equal the first, byte for byte."""
    root = _project(tmp_path)
    thirty, four_hundred = ["synthetic.n_patients=30"], ["synthetic.n_patients=400"]
    _run(root, "ingest", thirty)
    expected = _outcome(root)

    rng = np.random.default_rng(20260101)
    kills = 0
    # The 400-patient set has about 1200 files: kill after a seeded number of them.
    for after_files in sorted(int(k) for k in rng.integers(1, 1100, size=3)):
        started = time.time_ns()
        landed = _kill_when(
            root,
            "ingest",
            four_hundred,
            lambda n=after_files, t=started: _files_written_since(root / "data", t, ".dcm") >= n,
        )
        assert landed, f"the run ended before {after_files} files were written"
        kills += 1
        _run(root, "ingest", thirty)
        assert _outcome(root) == expected, f"after a kill at file {after_files}"
        # the run lock's file stays (its flock died with the run); no staging folder does
        left = sorted(p.name for p in (root / "data").iterdir() if p.name != LOCK_NAME)
        assert left == ["processed", "synthetic"]
    assert kills == 3


def _new_entries(folder: Path, known: set[str]) -> bool:
    """Whether ``folder`` holds an entry not in ``known`` (a run started writing there)."""
    return any(path.name not in known for path in folder.iterdir())


def test_ingestion_killed_at_seeded_points_leaves_a_whole_dataset_and_reruns_identically(
    tmp_path: Path,
) -> None:
    """Kill ``medtransfer ingest`` at seeded moments after it starts writing: each time the
    dataset in place is the previous one or the new one, whole; leftovers never pile up; the
    run after the kills equals an uninterrupted run."""
    root = _project(tmp_path)
    new, old = ["synthetic.n_patients=30"], ["synthetic.n_patients=30", "data.image_size=64"]
    _run(root, "ingest", new)
    expected = _outcome(root)
    _run(root, "ingest", old)
    previous = _outcome(root)
    assert previous["dataset_version"] != expected["dataset_version"]
    versions = {expected["dataset_version"], previous["dataset_version"]}

    rng = np.random.default_rng(7)
    data = root / "data"
    known = {path.name for path in data.iterdir()}
    landed = 0
    for delay in rng.uniform(0.0, 0.8, size=5):
        start = time.monotonic()

        def ready(delay: float = float(delay), start: float = start) -> bool:
            # After the run's first write beside the dataset, plus a seeded delay.
            return _new_entries(data, known) and time.monotonic() - start >= delay

        landed += _kill_when(root, "ingest", new, ready)
        processed = data / "processed"
        assert dataset_version(processed) in versions
        assert len(list(data.iterdir())) <= len(known) + 1  # at most this run's staging
    assert landed >= 3, "most kills must land while the run writes"

    _run(root, "ingest", new)
    assert _outcome(root) == expected
    assert {path.name for path in data.iterdir()} == known


def test_an_interrupted_swap_is_undone_at_the_next_start(tmp_path: Path) -> None:
    """A kill between the fallback swap's two renames leaves the old folder set aside and no
    folder in place; the next start puts the old folder back and removes staging leftovers."""
    target = tmp_path / "processed"
    aside = tmp_path / f"processed{atomic.ASIDE_MARK}0123"
    aside.mkdir()
    (aside / "dataset.json").write_text("old")
    for leftover in ("processed.staging", "processed.staging-abc"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "images.raw").write_bytes(b"half")
    atomic.recover_folder(target)
    assert (target / "dataset.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["processed"]


def test_a_failed_fallback_swap_keeps_the_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an exchange call, a failure renaming the new folder in puts the old one back."""
    target, staging = tmp_path / "out", tmp_path / "out.staging-x"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    real_rename = os.rename

    def rename(source: object, destination: object) -> None:
        if Path(str(source)) == staging:
            raise OSError("disk gone")
        real_rename(source, destination)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic.swap_in_folder(staging, target)
    assert (target / "f").read_text() == "old"
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    atomic.swap_in_folder(staging, target)
    assert (target / "f").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_failed_file_write_keeps_the_old_file_and_no_partial(tmp_path: Path) -> None:
    """``write_file``: a writer that fails leaves the previous file and no temporary; partial
    files a killed writer left are removed by the next write."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    (tmp_path / f".model.pt.killed{atomic.PARTIAL_SUFFIX}").write_bytes(b"half")

    def failing(partial: Path) -> None:
        partial.write_bytes(b"ne")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        atomic.write_file(path, failing)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    atomic.write_file(path, lambda partial: partial.write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
