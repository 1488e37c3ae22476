"""A labels CSV that says two things is refused; one that says a thing twice is counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import main as cli_main
from tasks import reports
from tasks.config import Params
from tasks.stages.ingest import run_ingest
from tests.conftest import make_mono_dataset, write_dataset

MARK = "zzfilemark"  # in every file name: the refusals must not print file names


def _folder(root: Path, n: int = 6) -> Path:
    """``n`` good DICOM files, one patient each, named ``<MARK>_<i>.dcm``."""
    rng = np.random.default_rng(0)
    folder = root / "dicoms"
    for i in range(n):
        ds = make_mono_dataset(rng.integers(0, 4096, (16, 16), dtype=np.uint16), patient_id=f"P{i}")
        write_dataset(ds, folder / f"{MARK}_{i}.dcm")
    return folder


def _ingest_cli(params_file: Path, folder: Path, rows: list[tuple[str, str]], tmp: Path) -> int:
    csv_path = tmp / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv_path, index=False)
    return cli_main(
        [
            "ingest",
            "--params",
            str(params_file),
            "-q",
            "-S",
            f"data.source={folder}",
            "-S",
            f"data.labels_csv={csv_path}",
        ]
    )


def _good_rows(n: int = 6) -> list[tuple[str, str]]:
    return [(f"{MARK}_{i}.dcm", "sick" if i % 2 else "healthy") for i in range(n)]


def test_conflicting_labels_for_one_file_are_refused_with_counts(
    params: Params, params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _folder(tmp_path)
    rows = [*_good_rows(), (f"{MARK}_0.dcm", "sick"), (f"{MARK}_1.dcm", "healthy")]
    rows.append((f"{MARK}_1.dcm", "healthy"))  # a repeat of a conflicting row counts once
    assert _ingest_cli(params_file, folder, rows, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "gives 2 path value(s) conflicting labels (4 distinct rows)" in err
    assert MARK not in err
    assert not Path(params.data.processed_dir).exists()


def test_labels_differing_only_in_case_are_refused_with_counts(
    params: Params, params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _folder(tmp_path)
    rows = _good_rows()
    rows[1] = (rows[1][0], "Sick")  # sick, Sick, sick: three rows of one class in two cases
    assert _ingest_cli(params_file, folder, rows, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "spells 1 label(s) in more than one case (Sick / sick; 3 rows)" in err
    assert not Path(params.data.processed_dir).exists()


def test_repeated_rows_and_rows_without_a_file_are_counted_in_the_report(
    params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder(tmp_path)
    rows = _good_rows() + [(f"{MARK}_2.dcm", "healthy")] * 2 + [("gone.dcm", "sick")]
    csv_path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv_path, index=False)
    result = run_ingest(
        params.with_overrides([f"data.source={folder}", f"data.labels_csv={csv_path}"]),
        progress=False,
    )
    expected = {"rows": 9, "identical_duplicates": 2, "rows_without_file": 1}
    assert reports.INGEST.read(params.reports_dir)["labels_csv"] == expected
    assert result.ingested == 6 and result.classes == {"healthy": 3, "sick": 3}
    assert "1 labels CSV rows name no file" in caplog.text


def test_sop_uid_rows_matching_no_decoded_file_are_counted(params: Params, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "by_uid"
    rows = []
    for i in range(4):
        uid = f"1.2.826.0.1.{i}"
        ds = make_mono_dataset(
            rng.integers(0, 4096, (16, 16), dtype=np.uint16), patient_id=f"P{i}", sop_uid=uid
        )
        write_dataset(ds, folder / f"{i}.dcm")
        rows.append((uid, "b" if i % 2 else "a"))
    rows += [("1.2.826.0.1.99", "a"), ("1.2.826.0.1.98", "b")]
    csv_path = tmp_path / "uids.csv"
    pd.DataFrame(rows, columns=["SOPInstanceUID", "label"]).to_csv(csv_path, index=False)
    result = run_ingest(
        params.with_overrides([f"data.source={folder}", f"data.labels_csv={csv_path}"]),
        progress=False,
    )
    assert result.labels_csv == {"rows": 6, "identical_duplicates": 0, "rows_without_file": 2}


OUTSIDE = "data.labels_csv lies outside the data.source folder"


def test_a_labels_csv_outside_the_source_folder_is_warned_about_without_its_path(
    params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # DVC's dependency is the folder: a change to this file alone would not re-run ingest
    folder = _folder(tmp_path)
    csv_path = tmp_path / f"{MARK}_labels.csv"
    pd.DataFrame(_good_rows(), columns=["path", "label"]).to_csv(csv_path, index=False)
    run_ingest(
        params.with_overrides([f"data.source={folder}", f"data.labels_csv={csv_path}"]),
        progress=False,
    )
    warned = [r.getMessage() for r in caplog.records if OUTSIDE in r.getMessage()]
    assert len(warned) == 1 and "dvc add" in warned[0]
    assert MARK not in caplog.text and str(tmp_path) not in caplog.text


@pytest.mark.parametrize("written_as", ["relative", "absolute"])
def test_a_labels_csv_inside_the_source_folder_gets_no_warning(
    params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture, written_as: str
) -> None:
    folder = _folder(tmp_path)
    pd.DataFrame(_good_rows(), columns=["path", "label"]).to_csv(folder / "labels.csv", index=False)
    csv = "labels.csv" if written_as == "relative" else str(folder / "labels.csv")
    result = run_ingest(
        params.with_overrides([f"data.source={folder}", f"data.labels_csv={csv}"]), progress=False
    )
    assert result.ingested == 6
    assert OUTSIDE not in caplog.text
