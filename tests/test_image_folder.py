"""An image folder (PNG / JPEG / TIFF files and a labels CSV) ingested as a DICOM folder is:
every file ingested or quarantined with a reason, colour kept, split by patient when the CSV
names patients, and no file's metadata copied anywhere."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import Params
from tasks.data.dataset import load_processed
from tasks.errors import MedtransferError
from tasks.stages.ingest import run_ingest
from tests.colour_samples import write_hue_image_folder

MARKER = "ZQXMARKER"


def _ingest(params: Params, folder: Path, *extra: str):
    overrides = [f"data.source={folder}", "data.labels_csv=labels.csv", "data.image_size=32"]
    return run_ingest(params.with_overrides([*overrides, *extra]), progress=False)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR declaring ``width`` x ``height`` RGB, and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + chunk
        + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    )


def test_a_png_and_jpeg_folder_with_patients_is_ingested_in_colour_and_split_by_patient(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 24, 32, 3, gray_every=6, jpeg_every=5)
    result = _ingest(params, folder)
    assert (result.source_kind, result.channels, result.split_by) == ("image_folder", 3, "patient")
    assert (result.files_seen, result.ingested, result.quarantined) == (24, 24, 0)
    assert result.gray_made_colour == 4  # i = 5, 11, 17, 23: PNGs saved gray
    report = json.loads((Path(params.reports_dir) / "ingest.json").read_text())
    assert report["split_by"] == "patient" and report["source_kind"] == "image_folder"
    dataset = load_processed(params.data.processed_dir)
    assert (dataset.source.kind, dataset.source.name) == ("image_folder", "image_folder")
    manifest = dataset.manifest
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1  # no patient in two
    assert manifest["patient_hash"].nunique() == 12
    # stored exactly as the file's pixels (32 px already: no resizing), channel first
    first = manifest.index[manifest["source_file"] == "sub/0000.png"][0]
    pixels = np.asarray(Image.open(folder / "sub/0000.png"))
    np.testing.assert_array_equal(dataset.images[first], np.moveaxis(pixels, -1, 0))
    jpeg = manifest.index[manifest["source_file"] == "0004.jpg"][0]
    decoded = np.asarray(Image.open(folder / "0004.jpg").convert("RGB"))
    np.testing.assert_array_equal(dataset.images[jpeg], np.moveaxis(decoded, -1, 0))
    gray = manifest.index[manifest["source_file"] == "0005.png"][0]
    assert (dataset.images[gray][0] == dataset.images[gray][1]).all()


def test_without_a_patient_column_each_image_is_its_own_patient_and_the_report_says_so(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 12, 32, 4, patients=False)
    result = _ingest(params, folder)
    assert result.split_by == "image"
    manifest = load_processed(params.data.processed_dir).manifest
    assert manifest["patient_hash"].nunique() == 12


def test_channels_gray_makes_a_colour_png_folder_luma(params: Params, tmp_path: Path) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 5)
    result = _ingest(params, folder, "data.channels=gray")
    dataset = load_processed(params.data.processed_dir)
    assert result.channels == 1 and dataset.images.shape == (8, 32, 32)
    first = dataset.manifest.index[dataset.manifest["source_file"] == "sub/0000.png"][0]
    rgb = np.asarray(Image.open(folder / "sub/0000.png"), dtype=np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    np.testing.assert_array_equal(dataset.images[first], np.rint(luma * 255).astype(np.uint8))


def test_every_bad_image_file_is_quarantined_with_its_reason(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 6)
    good = (folder / "0001.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])  # pixel data cut off
    (folder / "huge.png").write_bytes(_png_declaring(9000, 16))  # above max_image_dim
    (folder / "wide.png").write_bytes(_png_declaring(8192, 8192))  # 192 MiB: over the budget
    (folder / "notes.txt").write_text("not an image\n")
    frames = [Image.fromarray(np.zeros((8, 8), np.uint8)) for _ in range(2)]
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    (folder / "unlisted.png").write_bytes(good)
    with open(folder / "sparse.png", "wb") as sparse:  # 300 MiB, never read: too large a file
        sparse.write(good[:64])
        sparse.truncate(300 * 2**20)
    names = ["cut.png", "huge.png", "wide.png", "notes.txt", "pages.tif", "sparse.png"]
    with open(folder / "labels.csv", "a") as csv:
        csv.writelines(f"{name},positive,p-extra\n" for name in names)
    result = _ingest(params, folder)
    assert (result.files_seen, result.ingested, result.quarantined) == (15, 8, 7)
    quarantine = pd.read_csv(Path(params.data.processed_dir) / "quarantine.csv", dtype=str)
    reasons = dict(zip(quarantine["source_file"], quarantine["reason"], strict=True))
    assert reasons == {
        "cut.png": "decode_failed",
        "huge.png": "too_large",
        "notes.txt": "not_dicom",
        "pages.tif": "unsupported_image",
        "sparse.png": "too_large",
        "unlisted.png": "no_label",
        "wide.png": "too_large",
    }


def test_a_single_page_colour_tiff_is_ingested_as_its_pixels(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 7)
    pixels = np.asarray(Image.open(folder / "0001.png"))
    (folder / "0001.png").unlink()
    Image.fromarray(pixels).save(folder / "0001.tif")
    csv = folder / "labels.csv"
    csv.write_text(csv.read_text().replace("0001.png", "0001.tif"))
    _ingest(params, folder)
    dataset = load_processed(params.data.processed_dir)
    index = dataset.manifest.index[dataset.manifest["source_file"] == "0001.tif"][0]
    np.testing.assert_array_equal(dataset.images[index], np.moveaxis(pixels, -1, 0))


def test_no_exif_text_chunk_patient_or_file_name_reaches_the_dataset_or_report(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(
        tmp_path / "images", 12, 32, 8, jpeg_every=3, gray_every=4, marker=MARKER
    )
    (folder / f"{MARKER}broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _ingest(params, folder)
    written = [*Path(params.data.processed_dir).rglob("*"), *Path(params.reports_dir).rglob("*")]
    for path in (p for p in written if p.is_file()):
        text = path.read_bytes()
        # file names are kept only as manifest / quarantine paths (README, "names are data")
        if path.name in ("manifest.csv", "quarantine.csv"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            others = frame.drop(columns="source_file").to_csv().encode()
            assert MARKER.encode() not in others, path.name
            continue
        assert MARKER.encode() not in text, path


def test_a_csv_naming_only_files_that_do_not_exist_is_one_line(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 9)
    csv = folder / "labels.csv"
    csv.write_text(csv.read_text().replace("0", "/elsewhere/0"))
    with pytest.raises(MedtransferError, match=r"names 8 file\(s\) and none of them") as err:
        _ingest(params, folder)
    assert "\n" not in str(err.value) and "elsewhere" not in str(err.value)
    assert not Path(params.data.processed_dir).exists()


def test_one_file_given_two_patients_is_refused_with_counts(params: Params, tmp_path: Path) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 10)
    with open(folder / "labels.csv", "a") as csv:
        csv.write("0001.png,positive,someone-else\n")
    with pytest.raises(MedtransferError, match=r"1 path value\(s\) conflicting patients"):
        _ingest(params, folder)


def test_auto_reads_an_image_folders_native_resolution_from_its_headers(tmp_path: Path) -> None:
    from tasks.transfer.candidates import native_resolution

    folder = write_hue_image_folder(tmp_path / "images", 6, 48, 12, jpeg_every=2)
    assert native_resolution(folder) == 48


def _hue_pngs_at(folder: Path, n: int, seed: int, relative: Callable[[int], str]) -> list[str]:
    """Save ``n`` hue PNGs (``tests.colour_samples.hue_set`` at 32 px) at ``folder /
    relative(i)``; returns each one's label word, ``negative`` or ``positive``."""
    from tests.colour_samples import hue_set

    images, labels = hue_set(n, 32, seed)
    for i, image in enumerate(images):
        (folder / relative(i)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / relative(i))
    return ["positive" if label else "negative" for label in labels]


def _chexpert_style_folder(folder: Path, n: int) -> Path:
    """``n`` hue PNGs at CheXpert's paths (``train/patient<5 digits>/study1/view<k>_frontal``,
    two per patient) and a ``labels.csv`` with ``path`` and ``label`` and no patient column."""

    def relative(i: int) -> str:
        return f"train/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.png"

    words = _hue_pngs_at(folder, n, 7, relative)
    rows = ["path,label", *(f"{relative(i)},{word}" for i, word in enumerate(words))]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_patient_pattern_reads_chexpert_paths_and_keeps_each_patient_in_one_split(
    params: Params, tmp_path: Path
) -> None:
    folder = _chexpert_style_folder(tmp_path / "chexpert", 24)
    result = _ingest(params, folder, r"data.patient_from_path=patient(\d+)/")
    assert result.split_by == "patient" and result.ingested == 24
    manifest = load_processed(params.data.processed_dir).manifest
    assert manifest["patient_hash"].nunique() == 12
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1
    # the two views of patient 00003 share one patient, and no other image has it
    views = manifest[manifest["source_file"].str.startswith("train/patient00003/")]
    assert len(views) == 2 and views["patient_hash"].nunique() == 1
    assert (manifest["patient_hash"] == views["patient_hash"].iloc[0]).sum() == 2


def test_a_patient_pattern_that_misses_a_path_is_one_line_with_counts(
    params: Params, tmp_path: Path
) -> None:
    folder = _chexpert_style_folder(tmp_path / "chexpert", 6)
    with pytest.raises(MedtransferError) as refused:
        _ingest(params, folder, r"data.patient_from_path=patient(\d{5})/study2")
    message = str(refused.value)
    assert "finds no patient in 6 of the 6 paths" in message and "\n" not in message
    assert "train/patient" not in message  # counted, never quoted


@pytest.mark.parametrize(
    ("pattern", "said"),
    [
        ("patient\\d+/", "has 0 groups"),
        ("(p)(\\d+)", "has 2 groups"),
        ("patient(", "is not a regular"),
    ],
)
def test_a_patient_pattern_without_exactly_one_group_is_refused_by_the_loader(
    params: Params, pattern: str, said: str
) -> None:
    with pytest.raises(MedtransferError, match=said):
        params.with_overrides(["data.labels_csv=labels.csv", f"data.patient_from_path={pattern}"])


def test_a_patient_pattern_beside_a_patient_column_is_refused(
    params: Params, tmp_path: Path
) -> None:
    folder = write_hue_image_folder(tmp_path / "images", 8, 32, 3)
    with pytest.raises(MedtransferError, match=r"has a patient column and data\.patient_from_path"):
        _ingest(params, folder, r"data.patient_from_path=(\d+)")


def _nested_folder(folder: Path, n: int, duplicate: bool = False) -> Path:
    """``n`` hue PNGs in ChestX-ray14's sub-folders (``images_00<k>/images/<name>.png``) and a
    ``labels.csv`` naming each bare (``path`` = the file name, ``patient``); ``duplicate``
    puts a second file with the first one's name in another sub-folder."""

    def relative(i: int) -> str:
        return f"images_{i % 3 + 1:03d}/images/{i:08d}_000.png"

    words = _hue_pngs_at(folder, n, 11, relative)
    rows = ["path,label,patient"]
    rows += [f"{i:08d}_000.png,{word},{i // 2}" for i, word in enumerate(words)]
    if duplicate:
        shutil.copyfile(folder / relative(0), folder / "images_003" / "images" / "00000000_000.png")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_bare_file_names_label_the_files_in_sub_folders_by_name(
    params: Params, tmp_path: Path
) -> None:
    folder = _nested_folder(tmp_path / "nih", 12)
    result = _ingest(params, folder)
    assert (result.ingested, result.quarantined, result.split_by) == (12, 0, "patient")
    assert result.labels_csv["rows_without_file"] == 0
    manifest = load_processed(params.data.processed_dir).manifest
    row = manifest[manifest["source_file"] == "images_002/images/00000001_000.png"].iloc[0]
    assert row["label"] == "positive"  # file 1 (hue_set alternates negative, positive)
    assert manifest["patient_hash"].nunique() == 6


def test_a_bare_name_shared_by_two_files_is_refused_in_one_line(
    params: Params, tmp_path: Path
) -> None:
    folder = _nested_folder(tmp_path / "nih", 6, duplicate=True)
    with pytest.raises(MedtransferError) as refused:
        _ingest(params, folder)
    message = str(refused.value)
    assert "1 of those names belong to more than one file" in message and "\n" not in message
    assert "00000000_000" not in message
