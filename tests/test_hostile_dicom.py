"""Hostile DICOM files against decoding and ingestion: a deflate bomb is refused within a small
memory budget, and no DICOM value reaches a log, a reply or ``quarantine.csv``."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tasks.config import Params
from tasks.data import dicom_io, dicom_read, dicom_rejections
from tasks.data.dataset import QUARANTINE_FILE
from tasks.model.inference import InputRejected, prepare_dicom
from tasks.stages.ingest import run_ingest
from tests.conftest import make_mono_dataset
from tests.deploy.samples import dataset_bytes, deflate_bomb, deflated_dicom

REPO = Path(__file__).resolve().parents[1]
# Refusing the bomb may cost the bomb itself (1 MB), its header's image and some buffers; the
# unbounded inflate it replaces took 1 GiB.
BOMB_BUDGET_MIB = 48

MEASURE_BOMB = """
import io, json, resource, sys
from pathlib import Path
from tasks.data import file_decoding
from tasks.model.inference import InputRejected, prepare_dicom

bomb = Path(sys.argv[1])
data = bomb.read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prepare_dicom(data, 64)
    served = "accepted"
except InputRejected as err:
    served = f"{err.status} {err.reason}"
outcome = file_decoding.decode_to_outcome(bomb, bomb.parent, 64, "middle", "salt")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"served": served, "ingested": outcome.reason, "grew_kib": after - before}))
"""


def test_a_one_megabyte_deflate_bomb_is_refused_within_a_small_memory_budget(
    tmp_path: Path,
) -> None:
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(2**30))
    assert bomb.stat().st_size < 1.1e6  # 1 GiB of pixel data behind a 64 x 64 header
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_BOMB, str(bomb)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["served"] == "413 too_large"
    assert measured["ingested"] == dicom_rejections.TOO_LARGE
    assert measured["grew_kib"] < BOMB_BUDGET_MIB * 1024, measured  # peak RSS of the process


def test_a_deflated_image_decodes_exactly_like_its_uncompressed_twin() -> None:
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    ds = make_mono_dataset(pixels, WindowCenter=1500, WindowWidth=2000)
    plain = prepare_dicom(dataset_bytes(ds), 32)
    deflated = deflated_dicom(ds)
    assert dicom_read.read_dataset(io.BytesIO(deflated)).file_meta.TransferSyntaxUID != (
        ds.file_meta.TransferSyntaxUID.name
    )
    np.testing.assert_array_equal(prepare_dicom(deflated, 32), plain)


def test_an_image_over_the_dimension_limit_is_refused_before_decoding() -> None:
    ds = make_mono_dataset(np.zeros((300, 8), dtype=np.uint16))
    with pytest.raises(dicom_rejections.DicomRejected) as refused:
        dicom_io.decode_dataset(ds, max_image_dim=256)
    assert refused.value.reason == dicom_rejections.TOO_LARGE
    with pytest.raises(InputRejected) as rejected:
        prepare_dicom(deflated_dicom(ds), 32, max_image_dim=256)
    assert (rejected.value.status, rejected.value.reason) == (413, dicom_rejections.TOO_LARGE)
    # Within the dimensions, but colour: 220 x 220 x 3 bytes > 256 x 256 x 2 bytes.
    rgb = make_mono_dataset(np.zeros((4, 4), dtype=np.uint16))
    rgb.Rows, rgb.Columns, rgb.SamplesPerPixel, rgb.BitsAllocated = 220, 220, 3, 8
    with pytest.raises(dicom_rejections.DicomRejected) as refused:
        dicom_io.decode_dataset(rgb, max_image_dim=256)
    assert refused.value.reason == dicom_rejections.TOO_LARGE


MARKER = "ZQXMARK"  # in text values
UID_MARKER = "99887766"  # in UIDs (digits, so that valid UIDs can carry it)


def marked_datasets() -> dict[str, object]:
    """Files carrying the markers in UIDs, character sets and pixel-module values: two good
    images (one per class) and files each quarantined for a marked value."""
    rng = np.random.default_rng(0)

    def image(**attributes):
        pixels = rng.integers(0, 4096, size=(40, 40), dtype=np.uint16)
        return make_mono_dataset(
            pixels, sop_uid=f"1.2.826.0.1.{UID_MARKER}.{rng.integers(1e6)}", **attributes
        )

    good = {"StudyInstanceUID": f"1.2.840.{MARKER}.7", "SpecificCharacterSet": MARKER}
    files = {f"class{c}/good{i}.dcm": image(**good) for c in "ab" for i in range(3)}
    files["class_a/photometric.dcm"] = image(PhotometricInterpretation=MARKER)
    frames = image()
    # Stored raw: pydicom would not make an IS value of it.
    value = f"{MARKER} ".encode()
    frames[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value), value, 0, False, True)
    files["class_a/frames.dcm"] = frames
    syntax = image()
    syntax.file_meta.TransferSyntaxUID = f"1.2.840.{UID_MARKER}.{MARKER}"
    files["class_b/syntax.dcm"] = syntax
    return files


def test_no_dicom_value_reaches_the_log_or_the_quarantine_report(
    params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    folder = tmp_path / "marked"
    for name, ds in marked_datasets().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        # The encoding given: pydicom cannot infer it from the private transfer syntax.
        ds.save_as(folder / name, implicit_vr=False, little_endian=True, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        result = run_ingest(
            params.with_overrides(
                [f"data.source={folder}", "data.labels_csv=null", "data.workers=1"]
            ),
            progress=False,
        )
    assert result.ingested == 6 and result.quarantined == 3
    quarantine = Path(params.data.processed_dir) / QUARANTINE_FILE
    reasons = set(pd.read_csv(quarantine)["reason"])
    assert reasons == {"decode_failed", "unreadable", "unsupported_transfer_syntax"}
    captured = capfd.readouterr()
    outputs = [quarantine.read_text(), caplog.text, captured.out, captured.err]
    outputs += [p.read_text() for p in Path(params.reports_dir).glob("*.json")]
    for text in outputs:
        assert MARKER not in text and UID_MARKER not in text
    # pydicom's logger stays silenced after its import (pydicom resets it when imported).
    assert logging.getLogger("pydicom").getEffectiveLevel() > logging.CRITICAL
