"""A ``data.source`` of ZIP / TAR archives (one archive, or shards beside loose files) is
ingested as the folder they extract to, byte for byte; a bad member is quarantined with its
reason while the rest is ingested; a zip bomb member is refused unread; a truncated archive is
one line, and the previous dataset and the archive stay as they were."""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import Params
from tasks.data.archives import MAX_MEMBER_BYTES
from tasks.data.dataset import QUARANTINE_FILE, dataset_version, read_source
from tasks.data.synthetic import SyntheticConfig, generate
from tasks.errors import MedtransferError
from tasks.stages.ingest import run_ingest
from tests.colour_samples import write_hue_image_folder
from tests.conftest import params_in


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small synthetic set (50 DICOM files of 16 patients) copied to a plain folder, and
    its labels CSV beside it (outside the folder, so that no archive needs it)."""
    root = tmp_path_factory.mktemp("archives")
    folder, labels_csv = generate(SyntheticConfig.from_params(params_in(root)))
    source = root / "source"
    shutil.copytree(folder, source, ignore=shutil.ignore_patterns(labels_csv.name))
    shutil.copy(labels_csv, root / "labels.csv")
    return source, root / "labels.csv"


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _zip(folder: Path, files: list[Path], archive: Path) -> Path:
    """``files`` (under ``folder``) deflated into ``archive``, named by their relative paths."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in files:
            out.write(path, path.relative_to(folder).as_posix())
    return archive


def _tar(folder: Path, files: list[Path], archive: Path) -> Path:
    """``files`` into a TAR (gzip-compressed when ``archive`` ends in ``.gz``), in reverse name
    order: the reader may not rely on the order members are stored in."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz" if archive.suffix == ".gz" else "w") as out:
        for path in reversed(files):
            out.add(path, path.relative_to(folder).as_posix())
    return archive


def _ingest(params: Params, source: Path, labels_csv: Path | str, out: str, workers: int = 1):
    """Ingest ``source`` into ``<tmp>/<out>``; the result and the processed folder."""
    root = Path(params.reports_dir).parent / out
    overrides = [f"data.source={source}", f"data.labels_csv={labels_csv}",
                 f"data.processed_dir={root / 'processed'}", f"reports_dir={root / 'reports'}",
                 f"data.workers={workers}"]  # fmt: skip
    return run_ingest(params.with_overrides(overrides), progress=False), root / "processed"


def _shards_beside_loose_files(folder: Path, target: Path) -> Path:
    """``folder`` as a ZIP of its first 6 cases, a plain TAR inside the 7th case's sub-folder
    (members named from there) holding that case, and the other cases loose."""
    files = _files(folder)
    cases = sorted({path.relative_to(folder).parts[0] for path in files})

    def of(chosen: list[str]) -> list[Path]:
        return [path for path in files if path.relative_to(folder).parts[0] in chosen]

    _zip(folder, of(cases[:6]), target / "2026-01-01.zip")
    _tar(folder / cases[6], of(cases[6:7]), target / cases[6] / "batch.tar")
    for path in of(cases[7:]):
        (target / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.relative_to(folder))
    return target


@pytest.mark.parametrize("layout", ["zip", "tar.gz", "shards beside loose files, 2 workers"])
def test_archives_ingest_to_the_dataset_of_the_folder_they_extract_to(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path], layout: str
) -> None:
    folder, labels_csv = dicom_folder
    _, expected = _ingest(params, folder, labels_csv, "folder")
    if layout == "zip":
        source = _zip(folder, _files(folder), tmp_path / "in" / "export.zip")
    elif layout == "tar.gz":
        source = _tar(folder, _files(folder), tmp_path / "in" / "export.tar.gz")
    else:
        source = _shards_beside_loose_files(folder, tmp_path / "in" / "shards")
    before = {path: path.read_bytes() for path in _files(source.parent)}
    workers = 2 if "2 workers" in layout else 1
    result, processed = _ingest(params, source, labels_csv, "archive", workers)
    assert (result.files_seen, result.ingested, result.quarantined) == (50, 50, 0)
    assert dataset_version(processed) == dataset_version(expected)
    assert {path: path.read_bytes() for path in _files(source.parent)} == before  # untouched


def test_an_image_folder_zipped_ingests_to_the_image_folder_s_dataset(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 12, 32, 3, gray_every=6, jpeg_every=5)
    _, expected = _ingest(params, folder, "labels.csv", "folder")
    files = [path for path in _files(folder) if path.name != "labels.csv"]
    source = _zip(folder, files, tmp_path / "zipped" / "images.zip")
    shutil.copy(folder / "labels.csv", source.parent / "labels.csv")
    result, processed = _ingest(params, source.parent, "labels.csv", "archive")
    assert (result.source_kind, result.files_seen, result.ingested) == ("image_folder", 12, 12)
    assert dataset_version(processed) == dataset_version(expected)


def test_bad_members_are_quarantined_with_their_reasons_and_the_rest_ingested(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path]
) -> None:
    folder, labels_csv = dicom_folder
    _, expected = _ingest(params, folder, labels_csv, "folder")
    source = tmp_path / "source"
    _zip(folder, _files(folder), source / "good.zip")
    with tarfile.open(source / "odd.tar", "w") as odd:
        garbage = tarfile.TarInfo("odd/garbage.dcm")
        garbage.size = 9
        odd.addfile(garbage, io.BytesIO(b"not dicom"))
        link = tarfile.TarInfo("odd/link.dcm")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        odd.addfile(link)
    dicom = _files(folder)[0].read_bytes()
    with zipfile.ZipFile(source / "crc.zip", "w", zipfile.ZIP_STORED) as crc:
        crc.writestr("odd/crc.dcm", dicom)
        link = zipfile.ZipInfo("odd/zip-link.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symbolic link, as Info-ZIP stores
        crc.writestr(link, "/etc/passwd")
    stored = bytearray((source / "crc.zip").read_bytes())
    stored[len(stored) // 2] ^= 0xFF  # inside the member's data: its CRC no longer matches
    (source / "crc.zip").write_bytes(bytes(stored))
    result, processed = _ingest(params, source, labels_csv, "archive")
    assert (result.files_seen, result.ingested, result.quarantined) == (54, 50, 4)
    quarantine = pd.read_csv(processed / QUARANTINE_FILE).set_index("source_file")
    assert quarantine["reason"].to_dict() == {
        "odd/crc.dcm": "unreadable", "odd/garbage.dcm": "not_dicom", "odd/link.dcm": "unreadable",
        "odd/zip-link.dcm": "unreadable",
    }  # fmt: skip
    assert "a link" in quarantine.loc["odd/link.dcm", "detail"]
    assert "a link" in quarantine.loc["odd/zip-link.dcm", "detail"]
    assert "BadZipFile" in quarantine.loc["odd/crc.dcm", "detail"]
    assert read_source(processed).content_sha256 == read_source(expected).content_sha256


def test_a_zip_bomb_member_is_refused_unread_with_one_line(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path]
) -> None:
    folder, labels_csv = dicom_folder
    source = _zip(folder, _files(folder), tmp_path / "source" / "good.zip").parent
    with (
        zipfile.ZipFile(source / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as bomb,
        bomb.open("bomb/zeros.dcm", "w", force_zip64=True) as member,
    ):
        for _ in range(MAX_MEMBER_BYTES // 2**20 + 1):  # 258 MiB of zeros: 0.3 MB stored
            member.write(bytes(2**20))
    result, processed = _ingest(params, source, labels_csv, "archive")
    assert (result.files_seen, result.ingested, result.quarantined) == (51, 50, 1)
    row = pd.read_csv(processed / QUARANTINE_FILE).iloc[0]
    assert (row["source_file"], row["reason"]) == ("bomb/zeros.dcm", "too_large")
    assert "258 MiB" in row["detail"] and "not inflated" in row["detail"]
    assert "\n" not in row["detail"]


def _cut_zip(archive: Path) -> None:
    archive.write_bytes(archive.read_bytes()[:-100])  # its central directory's end is gone


def _cut_tar_at_a_member(archive: Path) -> None:
    with tarfile.open(archive) as stored:
        edge = stored.getmembers()[10].offset  # where the eleventh member's header starts
    archive.write_bytes(archive.read_bytes()[:edge])  # reads as a shorter, complete archive


@pytest.mark.parametrize("cut", [_cut_zip, _cut_tar_at_a_member])
def test_a_truncated_archive_is_one_line_and_the_previous_dataset_stays(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path], cut
) -> None:
    folder, labels_csv = dicom_folder
    _, previous = _ingest(params, folder, labels_csv, "archive")
    version = dataset_version(previous)
    archive = tmp_path / "source" / "day-1"
    archive = (_zip if cut is _cut_zip else _tar)(folder, _files(folder), archive.with_suffix(
        ".zip" if cut is _cut_zip else ".tar"))  # fmt: skip
    cut(archive)
    truncated = archive.read_bytes()
    with pytest.raises(MedtransferError, match="cannot be read as a ZIP or TAR") as error:
        _ingest(params, archive.parent, labels_csv, "archive")
    assert "Archive 1 of 1 in data.source" in str(error.value)  # named by place, not name
    assert "\n" not in str(error.value) and "day-1" not in str(error.value)
    assert dataset_version(previous) == version
    assert archive.read_bytes() == truncated


def test_a_member_and_a_loose_file_at_one_path_are_refused(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path]
) -> None:
    folder, labels_csv = dicom_folder
    source = _zip(folder, _files(folder)[:3], tmp_path / "source" / "a.zip").parent
    first = _files(folder)[0]
    (source / first.relative_to(folder)).parent.mkdir(parents=True)
    shutil.copy(first, source / first.relative_to(folder))
    with pytest.raises(MedtransferError, match=r"1 path.* occur twice"):
        _ingest(params, source, labels_csv, "archive")


def test_with_archives_a_flow_s_task_runner_gives_way_to_the_stage_s_pool_in_one_line(
    params: Params, tmp_path: Path, dicom_folder: tuple[Path, Path], caplog
) -> None:
    folder, labels_csv = dicom_folder
    source = _zip(folder, _files(folder), tmp_path / "in" / "export.zip")

    def task_runner_map(*args: object) -> None:
        raise AssertionError("the task runner's map was asked to read an archive's members")

    overrides = [f"data.source={source}", f"data.labels_csv={labels_csv}", "data.workers=1"]
    with caplog.at_level("WARNING", logger="tasks.data.ingestion"):
        result = run_ingest(params.with_overrides(overrides), False, task_runner_map)
    assert result.ingested == 50
    [line] = [r.getMessage() for r in caplog.records if r.name == "tasks.data.ingestion"]
    assert "not orchestration.task_runner" in line and "export" not in line
