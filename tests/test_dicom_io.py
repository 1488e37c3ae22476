"""Known-value and fuzz tests of the DICOM decoder on files built here."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from tasks.data import dicom_display, dicom_io, dicom_rejections
from tasks.data.file_decoding import decode_to_outcome
from tests.conftest import make_mono_dataset, write_dataset


def test_rescale_then_window_gives_known_values() -> None:
    # stored 0..4000, slope 2, intercept -1000 → modality -1000..7000; window [0, 4000]
    stored = np.array([[0, 500, 1000], [2000, 2500, 4000]], dtype=np.uint16)
    ds = make_mono_dataset(
        stored,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter="2000.5",
        WindowWidth="4001",
    )
    decoded = dicom_io.decode_dataset(ds)
    modality = stored * 2.0 - 1000
    expected = np.clip(modality / 4000.0, 0, 1)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-4)
    assert decoded.notes == ["rescale", "window"]


def test_window_function_matches_the_dicom_standard() -> None:
    values = np.array([-10.0, 39.5, 40.0, 89.0, 200.0], dtype=np.float32)
    out = dicom_display.window_linear(values, center=40.0, width=100.0)
    # ((x - (c - 0.5)) / (w - 1) + 0.5) clipped to [0, 1]
    expected = np.clip((values - 39.5) / 99.0 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[0] == 0.0 and out[-1] == 1.0


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 1023], [2047, 4095]], dtype=np.uint16)
    mono2 = dicom_io.decode_dataset(make_mono_dataset(stored)).frames[0]
    mono1 = dicom_io.decode_dataset(make_mono_dataset(stored, photometric="MONOCHROME1")).frames[0]
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[0, 0] == 0.0 and mono1[0, 0] == 1.0  # stored 0 is black in MONOCHROME2 only


def test_no_window_falls_back_to_the_image_range() -> None:
    stored = np.array([[100, 200], [300, 500]], dtype=np.uint16)
    decoded = dicom_io.decode_dataset(make_mono_dataset(stored))
    np.testing.assert_allclose(decoded.frames[0], (stored - 100) / 400.0, atol=1e-6)
    assert decoded.notes == ["minmax"]


def test_multiframe_middle_and_all() -> None:
    frames = np.stack([np.full((4, 4), value, dtype=np.uint16) for value in (0, 1000, 2000)])
    frames[:, 0, 0] = 4095  # give every frame the same range so minmax keeps the level visible
    ds = make_mono_dataset(frames, WindowCenter="2048", WindowWidth="4096")
    middle = dicom_io.decode_dataset(ds, multiframe="middle")
    assert middle.frames.shape == (1, 4, 4)
    np.testing.assert_allclose(
        middle.frames[0, 1, 1], dicom_display.window_linear(np.float32(1000), 2048, 4096)
    )
    every = dicom_io.decode_dataset(ds, multiframe="all")
    assert every.frames.shape == (3, 4, 4)
    assert every.frames[0, 1, 1] < every.frames[1, 1, 1] < every.frames[2, 1, 1]
    assert "frames:3->1" in middle.notes


def test_rle_compressed_matches_uncompressed() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)
    plain = make_mono_dataset(stored, WindowCenter="2048", WindowWidth="4096")
    rle = make_mono_dataset(stored, WindowCenter="2048", WindowWidth="4096")
    rle.compress(RLELossless, generate_instance_uid=False)
    np.testing.assert_array_equal(
        dicom_io.decode_dataset(rle).frames, dicom_io.decode_dataset(plain).frames
    )


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (255, 255, 255)
    ds = make_mono_dataset(np.zeros((2, 2), dtype=np.uint16))
    ds.set_pixel_data(
        rgb, photometric_interpretation="RGB", bits_stored=8, generate_instance_uid=False
    )
    decoded = dicom_io.decode_dataset(ds)
    assert decoded.frames.shape == (1, 2, 2)
    assert decoded.frames[0, 0, 0] == pytest.approx(0.299, abs=1e-3)
    assert decoded.frames[0, 1, 1] == pytest.approx(1.0, abs=1e-3)
    assert "rgb_to_gray" in decoded.notes


def test_missing_pixel_data_is_rejected() -> None:
    ds = make_mono_dataset(np.zeros((2, 2), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(dicom_rejections.DicomRejected) as err:
        dicom_io.decode_dataset(ds)
    assert err.value.reason == dicom_rejections.NO_PIXEL_DATA


def test_unsupported_transfer_syntax_is_rejected() -> None:
    ds = make_mono_dataset(np.zeros((8, 8), dtype=np.uint8), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    ds.PixelData = encapsulate([b"\x00" * 64])
    with pytest.raises(dicom_rejections.DicomRejected) as err:
        dicom_io.decode_dataset(ds)
    assert err.value.reason == dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX


def _valid_file_bytes() -> bytes:
    rng = np.random.default_rng(1)
    ds = make_mono_dataset(
        rng.integers(0, 4096, size=(24, 24), dtype=np.uint16),
        WindowCenter="2048",
        WindowWidth="4096",
    )
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


VALID_BYTES = _valid_file_bytes()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0, max_value=len(VALID_BYTES) - 1))
def test_truncated_files_are_quarantined_never_crash(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(VALID_BYTES[:cut])
    outcome = decode_to_outcome(path, tmp_path, 16, "middle", "salt")
    # Cutting into the 1152-byte pixel data always loses pixels; cutting earlier loses the header.
    assert outcome.reason in {
        dicom_rejections.NOT_DICOM,
        dicom_rejections.UNREADABLE,
        dicom_rejections.NO_PIXEL_DATA,
        dicom_rejections.DECODE_FAILED,
    }
    assert outcome.images == []


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(VALID_BYTES) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_byte_flips_never_crash(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID_BYTES)
    for position, mask in flips:
        data[position] ^= mask
    path = tmp_path / "flipped.dcm"
    path.write_bytes(bytes(data))
    outcome = decode_to_outcome(path, tmp_path, 16, "middle", "salt")
    # Either a clean rejection, or an image of the right shape and type (a flip inside the
    # pixel values leaves a valid, slightly different image).
    if outcome.reason:
        assert outcome.reason in {
            dicom_rejections.NOT_DICOM,
            dicom_rejections.UNREADABLE,
            dicom_rejections.NO_PIXEL_DATA,
            dicom_rejections.DECODE_FAILED,
            dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX,
            dicom_rejections.UNSUPPORTED_IMAGE,
            # A flipped Rows or Columns byte can declare an image over the size limit.
            dicom_rejections.TOO_LARGE,
        }
        assert outcome.detail
    else:
        assert len(outcome.images) >= 1
        assert all(image.shape == (16, 16) and image.dtype == np.uint8 for image in outcome.images)


def test_file_on_disk_roundtrip(tmp_path: Path) -> None:
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64
    path = write_dataset(make_mono_dataset(stored), tmp_path / "a" / "b.dcm")
    outcome = decode_to_outcome(path, tmp_path, 8, "middle", "salt")
    assert outcome.reason == ""
    assert outcome.source_file == "a/b.dcm"
    assert outcome.images[0][0, 0] == 0 and outcome.images[0][-1, -1] == 255
    assert len(outcome.patient_hash) == 16 and "PID-1" not in outcome.patient_hash


def test_an_rle_stream_that_makes_the_rust_decoder_panic_is_rejected_not_raised() -> None:
    """pylibjpeg-rle panics on this corrupt stream; pyo3's PanicException is a BaseException,
    which used to escape every ``except Exception`` and take the service worker down."""
    from pydicom.data import get_testdata_file

    from tasks.model.inference import InputRejected, prepare_dicom

    corrupt = bytearray(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())
    corrupt[2736] = 208  # one byte of the first RLE segment, found by fuzzing
    with pytest.raises(dicom_rejections.DicomRejected) as rejected:
        dicom_io.decode_file(BytesIO(bytes(corrupt)))
    assert rejected.value.reason == dicom_rejections.DECODE_FAILED
    with pytest.raises(InputRejected, match=dicom_rejections.DECODE_FAILED):
        prepare_dicom(bytes(corrupt), 64)
