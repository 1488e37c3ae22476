"""Ingestion never touches the source: outputs that would overwrite or delete it are refused
before anything is written, and the source tree's bytes stay exactly as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as cli_main
from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.stages.ingest import run_ingest
from tests.conftest import make_mono_dataset, write_dataset


def _tree_digest(root: Path) -> str:
    """SHA-256 over every path under ``root`` (files and folders) and every file's bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A DICOM folder labelled by class sub-folders: 4 patients x 2 classes, 16x16 images."""
    folder = tmp_path / "export" / "dicom"
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        for patient in range(4):
            pixels = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)
            ds = make_mono_dataset(pixels, patient_id=f"{label}-{patient}")
            write_dataset(ds, folder / label / f"{patient}.dcm")
    return folder


def _with_outputs(params: Params, source: Path, processed: Path) -> Params:
    return params.with_overrides(
        [f"data.source={source}", "data.labels_csv=null", f"data.processed_dir={processed}"]
    )


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda src: src, id="the-source-itself"),
        pytest.param(lambda src: src / "processed", id="inside-the-source"),
        pytest.param(lambda src: src.parent, id="the-sources-parent"),
        pytest.param(lambda src: src / "benign", id="a-class-folder-of-the-source"),
    ],
)
def test_a_processed_dir_overlapping_the_source_is_refused_and_the_source_is_unchanged(
    params: Params, source: Path, where
) -> None:
    before = _tree_digest(source.parent)
    with pytest.raises(MedtransferError, match="would delete the source files") as refused:
        run_ingest(_with_outputs(params, source, where(source)), progress=False)
    assert "\n" not in str(refused.value) and str(source) not in str(refused.value)
    assert _tree_digest(source.parent) == before


def test_a_processed_dir_naming_an_existing_file_is_refused_and_the_file_kept(
    params: Params, source: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's own file")
    with pytest.raises(MedtransferError, match="names an existing file"):
        run_ingest(_with_outputs(params, source, existing), progress=False)
    assert existing.read_text() == "the user's own file"


def test_a_reports_dir_inside_the_source_is_refused_before_anything_is_written(
    params: Params, source: Path, tmp_path: Path
) -> None:
    before = _tree_digest(source.parent)
    processed = tmp_path / "processed"
    settings = _with_outputs(params, source, processed).with_overrides(
        [f"reports_dir={source / 'reports'}"]
    )
    with pytest.raises(MedtransferError, match=r"reports_dir lies inside data\.source"):
        run_ingest(settings, progress=False)
    assert _tree_digest(source.parent) == before and not processed.exists()


def test_the_cli_refuses_ingesting_into_the_source_with_one_line_and_exit_2(
    params_file: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _tree_digest(source)
    status = cli_main(
        [
            "ingest",
            "--params",
            str(params_file),
            "-q",
            f"-Sdata.source={source}",
            "-Sdata.labels_csv=null",
            f"-Sdata.processed_dir={source}",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "would delete the source files" in lines[0], captured.err
    assert _tree_digest(source) == before and len(list(source.rglob("*.dcm"))) == 8


def test_a_processed_dir_beside_the_source_ingests_every_file(
    params: Params, source: Path, tmp_path: Path
) -> None:
    before = _tree_digest(source)
    result = run_ingest(_with_outputs(params, source, tmp_path / "processed"), progress=False)
    assert result.files_seen == result.ingested == 8
    assert _tree_digest(source) == before
