"""Compressed-stream bombs (issue 21): a codestream that declares a larger image than its DICOM
header, or a PNG larger than the decoded-pixel budget, is refused before any decoder runs:
413 ``too_large`` in the service, quarantined ``too_large`` in ingestion, in a process whose
memory stays small."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from tasks.config import Params
from tasks.data import dicom_io, dicom_read, dicom_rejections
from tasks.data.dataset import QUARANTINE_FILE
from tasks.model.inference import InputRejected, prepare_dicom, prepare_png
from tasks.stages.ingest import run_ingest
from tests import bombs

REPO = Path(__file__).resolve().parents[1]
DICOM_BOMBS = {
    "jpeg_lossless_65000.dcm": bombs.jpeg_lossless_bomb,
    "jpeg_ls_65000.dcm": bombs.jpeg_ls_bomb,
    "j2k_40000.dcm": bombs.j2k_bomb,
}
# Refusing a bomb costs the bomb (under 600 KB), its parsed header and some buffers. Decoding
# the JPEG-Lossless one took 16.2 GB before the OOM killer; the JPEG 2000 one 10.5 GB.
BOMB_BUDGET_MIB = 64

MEASURE = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")
from tests import bombs
from tasks.model.inference import InputRejected, prepare_dicom, prepare_png

builder, kind = sys.argv[1], sys.argv[2]
data = getattr(bombs, builder)()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    (prepare_png if kind == "png" else prepare_dicom)(data, 64)
    served = "200"
except InputRejected as err:
    served = f"{err.status} {err.reason}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"served": served, "grew_kib": after - before, "peak_kib": after}))
"""


def test_each_codestream_bomb_is_refused_too_large_before_decoding() -> None:
    for build in DICOM_BOMBS.values():
        data = build()
        ds = dicom_read.read_dataset(io.BytesIO(data))
        with pytest.raises(dicom_rejections.DicomRejected) as refused:
            dicom_io.decode_dataset(ds)
        assert refused.value.reason == dicom_rejections.TOO_LARGE
        assert refused.value.detail == "a compressed frame declares a larger image than its header"
        with pytest.raises(InputRejected) as rejected:
            prepare_dicom(data, 64)
        assert (rejected.value.status, rejected.value.reason) == (413, "too_large")


def test_a_png_over_the_decoded_budget_is_413_and_one_within_it_is_classified() -> None:
    for bomb in (bombs.png_ihdr_bomb(8192, 16, 6), bombs.png_ihdr_bomb(8192, 8, 2)):
        with pytest.raises(InputRejected) as rejected:
            prepare_png(bomb, 64)  # 512 MiB, 192 MiB > 128 MiB
        assert (rejected.value.status, rejected.value.reason) == (413, "too_large")
    # 256 x 256 RGBA16 is 512 KiB: over a 0.5 MiB - 1 budget, within 0.5 MiB.
    image = bombs.png_of_zeros(256, 16, 6)
    with pytest.raises(InputRejected):
        prepare_png(image, 64, max_decoded_bytes=2**19 - 1)
    assert prepare_png(image, 64, max_decoded_bytes=2**19).shape == (64, 64)


def test_a_png_wider_than_the_dimension_limit_is_refused_from_its_header() -> None:
    with pytest.raises(InputRejected) as rejected:
        prepare_png(bombs.png_ihdr_bomb(8193, 1, 0), 64)
    assert (rejected.value.status, rejected.value.reason) == (422, "image_too_large")


def _rewritten(name: str, rewrite) -> pydicom.Dataset:
    ds = pydicom.dcmread(bombs.corpus_file(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([rewrite(bytearray(frame))])
    return ds


def test_a_frame_smaller_than_its_header_or_with_wrong_rle_segments_is_decode_failed() -> None:
    def shrink(frame: bytearray) -> bytes:
        sof = bombs._jpeg_sof_offset(bytes(frame))
        frame[sof + 5 : sof + 9] = (32).to_bytes(2, "big") * 2  # 32 x 32 in a 64 x 64 header
        return bytes(frame)

    def one_segment(frame: bytearray) -> bytes:
        frame[0:4] = (1).to_bytes(4, "little")  # 16-bit grey needs 2 segments
        return bytes(frame)

    for ds, detail in (
        (_rewritten("MR_small_jpeg_ls_lossless.dcm", shrink), "size differs"),
        (_rewritten("MR_small_RLE.dcm", one_segment), "RLE segments"),
    ):
        with pytest.raises(dicom_rejections.DicomRejected, match=detail) as refused:
            dicom_io.decode_dataset(ds)
        assert refused.value.reason == dicom_rejections.DECODE_FAILED


def test_the_real_files_the_bombs_come_from_still_decode() -> None:
    for name in (bombs.JPEG_LOSSLESS_SOURCE, bombs.JPEG_LS_SOURCE, bombs.J2K_SOURCE):
        ds = pydicom.dcmread(bombs.corpus_file(name))
        decoded = dicom_io.decode_file(bombs.corpus_file(name))
        assert decoded.frames.shape == (1, ds.Rows, ds.Columns)


def test_ingestion_quarantines_each_bomb_too_large_and_keeps_the_count(
    params: Params, tmp_path: Path
) -> None:
    folder = tmp_path / "bombs"
    for name, build in DICOM_BOMBS.items():
        (folder / "a").mkdir(parents=True, exist_ok=True)
        (folder / "a" / name).write_bytes(build())
    for i, name in enumerate(
        (bombs.JPEG_LOSSLESS_SOURCE, bombs.JPEG_LS_SOURCE, bombs.J2K_SOURCE, "SC_rgb_rle.dcm")
    ):
        (folder / "ab"[i % 2]).mkdir(exist_ok=True)
        (folder / "ab"[i % 2] / name).write_bytes(bombs.corpus_file(name).read_bytes())
    result = run_ingest(
        params.with_overrides([f"data.source={folder}", "data.labels_csv=null"]), progress=False
    )
    quarantine = pd.read_csv(Path(params.data.processed_dir) / QUARANTINE_FILE)
    assert (result.files_seen, result.ingested, result.quarantined) == (7, 4, 3)
    assert result.ingested + result.quarantined == result.files_seen
    assert sorted(Path(f).name for f in quarantine["source_file"]) == sorted(DICOM_BOMBS)
    assert set(quarantine["reason"]) == {dicom_rejections.TOO_LARGE}


@pytest.mark.parametrize(
    ("builder", "kind"),
    [
        ("jpeg_lossless_bomb", "dicom"),
        ("jpeg_ls_bomb", "dicom"),
        ("j2k_bomb", "dicom"),
        ("png_ihdr_bomb", "png"),
    ],
)
def test_a_bomb_is_refused_in_a_process_that_stays_small(builder: str, kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, builder, kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["served"] == "413 too_large", measured
    assert measured["grew_kib"] < BOMB_BUDGET_MIB * 1024, measured  # peak RSS of the process
    assert measured["peak_kib"] < 2 * 1024 * 1024, measured  # the 2 GiB, whole process
