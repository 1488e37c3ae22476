"""pydicom 3 behaviours of the DICOM decoder: the dataset encoding, VOI LUT Functions,
Presentation LUT Shape, and decoding one frame of a multi-frame file.

Every expected value is computed here from the formulas of the DICOM standard
(PS3.3 C.11.2.1.2 and C.11.2.1.3 for the windows, C.11.6.1.2 for the Presentation LUT Shape).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.data import dicom_io
from tests.conftest import make_mono_dataset


@pytest.fixture
def pydicom_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's own preview of version 4: its deprecated attributes raise AttributeError."""
    monkeypatch.setattr(pydicom.config, "_use_future", True)


def _headerless_bytes(implicit_vr: bool, little_endian: bool) -> bytes:
    """A dataset written without preamble or File Meta (old ACR-NEMA style), as bytes."""
    stored = np.arange(6, dtype=np.uint16).reshape(2, 3) * 100
    ds = make_mono_dataset(stored)
    del ds.file_meta
    if not little_endian:  # pydicom writes Pixel Data bytes as given: give them big endian
        ds.PixelData = stored.astype(">u2").tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=implicit_vr, little_endian=little_endian)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "expected"),
    [
        (True, True, ImplicitVRLittleEndian),
        (False, True, ExplicitVRLittleEndian),
        (False, False, ExplicitVRBigEndian),
    ],
)
@pytest.mark.usefixtures("pydicom_future")
def test_a_headerless_file_gets_the_transfer_syntax_it_was_read_with_without_deprecated_attributes(
    implicit_vr: bool, little_endian: bool, expected: str
) -> None:
    ds = dicom_io.read_dataset(BytesIO(_headerless_bytes(implicit_vr, little_endian)))
    assert ds.file_meta.TransferSyntaxUID == expected


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)]
)
@pytest.mark.usefixtures("pydicom_future")
def test_a_headerless_file_decodes_without_deprecated_pixel_access(
    implicit_vr: bool, little_endian: bool
) -> None:
    ds = dicom_io.read_dataset(BytesIO(_headerless_bytes(implicit_vr, little_endian)))
    decoded = dicom_io.decode_dataset(ds)
    # stored 0..500 with no window: the image's own range, (x - 0) / 500
    expected = np.arange(6, dtype=np.float32).reshape(2, 3) / 5.0
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)


def _distinct_frames(n_frames: int, rows: int = 4, columns: int = 4) -> np.ndarray:
    """Frame ``i`` holds the stored value ``60 * i`` everywhere but one pixel of 4095."""
    frames = np.stack([np.full((rows, columns), 60 * i, dtype=np.uint16) for i in range(n_frames)])
    frames[:, 0, 0] = 4095  # the same range in every frame
    return frames


@pytest.mark.parametrize("compress", [False, True], ids=["native", "rle"])
def test_middle_mode_returns_the_middle_frame_of_a_multiframe_file(compress: bool) -> None:
    ds = make_mono_dataset(_distinct_frames(5), WindowCenter="2048", WindowWidth="4096")
    if compress:
        ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    middle = dicom_io.decode_dataset(ds, multiframe="middle")
    assert middle.frames.shape == (1, 4, 4)
    # frame 2 holds 120: LINEAR window (120 - 2047.5) / 4095 + 0.5
    assert middle.frames[0, 1, 1] == pytest.approx((120 - 2047.5) / 4095 + 0.5, abs=1e-6)
    every = dicom_io.decode_dataset(ds, multiframe="all")
    np.testing.assert_array_equal(every.frames[2], middle.frames[0])
    assert every.frames.shape == (5, 4, 4)


def test_middle_mode_decodes_one_frame_not_the_whole_volume() -> None:
    import tracemalloc

    volume = _distinct_frames(64, rows=256, columns=256)  # 8 MiB of stored values
    ds = make_mono_dataset(volume, WindowCenter="2048", WindowWidth="4096")
    del volume
    tracemalloc.start()
    try:
        decoded = dicom_io.decode_dataset(ds, multiframe="middle")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.frames[0, 1, 1] == pytest.approx((1920 - 2047.5) / 4095 + 0.5, abs=1e-6)
    # One frame is 128 KiB stored and 256 KiB as float32; a few working copies of it fit well
    # under a quarter of the volume, while decoding the whole volume needs all 8 MiB at once.
    full_volume_bytes = 64 * 256 * 256 * 2
    assert peak < full_volume_bytes / 4
