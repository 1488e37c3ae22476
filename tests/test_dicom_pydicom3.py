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
from pydicom.datadict import tag_for_keyword
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.data import dicom_display, dicom_io, dicom_read, dicom_rejections
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
    ds = dicom_read.read_dataset(BytesIO(_headerless_bytes(implicit_vr, little_endian)))
    assert ds.file_meta.TransferSyntaxUID == expected


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)]
)
@pytest.mark.usefixtures("pydicom_future")
def test_a_headerless_file_decodes_without_deprecated_pixel_access(
    implicit_vr: bool, little_endian: bool
) -> None:
    ds = dicom_read.read_dataset(BytesIO(_headerless_bytes(implicit_vr, little_endian)))
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


# A 1 x 10 ramp of stored values across a 12-bit range, and one window for every function.
RAMP = np.array([[0, 500, 1000, 1500, 2000, 2047, 2048, 2500, 3000, 4095]], dtype=np.uint16)
CENTER, WIDTH = 2048.0, 1000.0


def _sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 with y_min 0 and y_max 1: 1 / (1 + exp(-4 (x - c) / w))."""
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def _linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 with y_min 0 and y_max 1: (x - c) / w + 0.5, clipped."""
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def test_sigmoid_voi_lut_function_gives_the_standards_values() -> None:
    ds = make_mono_dataset(
        RAMP, WindowCenter=str(CENTER), WindowWidth=str(WIDTH), VOILUTFunction="SIGMOID"
    )
    decoded = dicom_io.decode_dataset(ds)
    expected = _sigmoid(RAMP.astype(np.float64), CENTER, WIDTH)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)
    assert decoded.frames[0, 0, 6] == pytest.approx(0.5)  # the center maps to the middle
    assert decoded.notes == ["window_sigmoid"]


def test_sigmoid_applies_to_rescaled_values() -> None:
    # modality value = 2 * stored - 1000; the window is in modality units
    ds = make_mono_dataset(
        RAMP,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter="3000",
        WindowWidth="2000",
        VOILUTFunction="SIGMOID",
    )
    decoded = dicom_io.decode_dataset(ds)
    expected = _sigmoid(RAMP * 2.0 - 1000, 3000.0, 2000.0)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)
    assert decoded.notes == ["rescale", "window_sigmoid"]


def test_linear_exact_voi_lut_function_gives_the_standards_values() -> None:
    ds = make_mono_dataset(
        RAMP, WindowCenter=str(CENTER), WindowWidth=str(WIDTH), VOILUTFunction="LINEAR_EXACT"
    )
    decoded = dicom_io.decode_dataset(ds)
    expected = _linear_exact(RAMP.astype(np.float64), CENTER, WIDTH)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)
    # c - w/2 = 1548 and c + w/2 = 2548 are the ends: 1500 is black, 2500 not yet white
    assert decoded.frames[0, 0, 3] == 0.0 and decoded.frames[0, 0, 7] == pytest.approx(0.952)
    assert decoded.notes == ["window_linear_exact"]


def test_linear_exact_accepts_a_width_below_one() -> None:
    # LINEAR needs w >= 1; LINEAR_EXACT only w > 0 (PS3.3 C.11.2.1.3.2): a threshold at 2047.75
    ds = make_mono_dataset(
        RAMP, WindowCenter="2047.75", WindowWidth="0.5", VOILUTFunction="LINEAR_EXACT"
    )
    decoded = dicom_io.decode_dataset(ds)
    expected = _linear_exact(RAMP.astype(np.float64), 2047.75, 0.5)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)
    assert decoded.frames[0, 0, 5] == 0.0 and decoded.frames[0, 0, 6] == 1.0


def test_the_voi_lut_function_of_a_frames_functional_group_is_used() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.stack([RAMP[0:1], RAMP[0:1]])  # two frames, 1 x 10 each
    ds = make_mono_dataset(frames)
    groups = []
    for function in ("LINEAR_EXACT", "SIGMOID"):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = str(CENTER), str(WIDTH), function
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    decoded = dicom_io.decode_dataset(ds, multiframe="all")
    ramp = RAMP[0].astype(np.float64)
    np.testing.assert_allclose(decoded.frames[0, 0], _linear_exact(ramp, CENTER, WIDTH), atol=1e-6)
    np.testing.assert_allclose(decoded.frames[1, 0], _sigmoid(ramp, CENTER, WIDTH), atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_every_voi_lut_function_agrees_with_pydicoms_apply_windowing(function: str) -> None:
    from pydicom.pixels import apply_windowing

    ds = make_mono_dataset(
        RAMP, WindowCenter=str(CENTER), WindowWidth=str(WIDTH), VOILUTFunction=function
    )
    # pydicom's output spans the stored range, [0, 2**12 - 1] here; ours spans [0, 1].
    reference = apply_windowing(RAMP.astype(np.float64), ds) / (2**12 - 1)
    np.testing.assert_allclose(dicom_io.decode_dataset(ds).frames[0], reference, atol=1e-6)


def test_presentation_lut_shape_inverse_inverts_a_monochrome2_image() -> None:
    plain = dicom_io.decode_dataset(make_mono_dataset(RAMP)).frames[0]
    inverse = dicom_io.decode_dataset(make_mono_dataset(RAMP, PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(inverse.frames[0], 1.0 - plain, atol=1e-6)
    assert inverse.frames[0, 0, 0] == 1.0  # stored 0 is now white
    assert inverse.notes == ["minmax", "presentation_lut_inverted"]


def test_presentation_lut_shape_inverse_inverts_after_the_window() -> None:
    ds = make_mono_dataset(
        RAMP,
        WindowCenter=str(CENTER),
        WindowWidth=str(WIDTH),
        VOILUTFunction="SIGMOID",
        PresentationLUTShape="INVERSE",
    )
    expected = 1.0 - _sigmoid(RAMP.astype(np.float64), CENTER, WIDTH)
    np.testing.assert_allclose(dicom_io.decode_dataset(ds).frames[0], expected, atol=1e-6)


@pytest.mark.parametrize("shape", ["INVERSE", "IDENTITY"])
def test_monochrome1_is_inverted_once_whatever_presentation_lut_shape_says(shape: str) -> None:
    # PS3.3 asks for INVERSE exactly when the image is MONOCHROME1 (e.g. C.8.11.3, DX Image):
    # both name one inversion, never two; IDENTITY on MONOCHROME1 breaks that rule and the
    # photometric interpretation wins. Either way the result is MONOCHROME1's own inversion.
    mono2 = dicom_io.decode_dataset(make_mono_dataset(RAMP)).frames[0]
    mono1 = dicom_io.decode_dataset(
        make_mono_dataset(RAMP, photometric="MONOCHROME1", PresentationLUTShape=shape)
    )
    np.testing.assert_allclose(mono1.frames[0], 1.0 - mono2, atol=1e-6)
    assert mono1.notes == ["minmax", "monochrome1_inverted"]


def test_presentation_lut_shape_identity_leaves_a_monochrome2_image_alone() -> None:
    plain = dicom_io.decode_dataset(make_mono_dataset(RAMP)).frames[0]
    identity = dicom_io.decode_dataset(make_mono_dataset(RAMP, PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(identity.frames[0], plain)
    assert identity.notes == ["minmax"]


def test_an_undefined_voi_lut_function_or_shape_falls_back_and_is_noted_without_its_value() -> None:
    ds = make_mono_dataset(
        RAMP,
        WindowCenter=str(CENTER),
        WindowWidth=str(WIDTH),
        VOILUTFunction="CUBIC",
        PresentationLUTShape="SWIRL",
    )
    decoded = dicom_io.decode_dataset(ds)
    expected = dicom_display.window_linear(RAMP.astype(np.float32), CENTER, WIDTH)
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-6)
    assert decoded.notes == ["voi_lut_function_unknown", "window", "presentation_lut_shape_unknown"]
    assert not any("CUBIC" in note or "SWIRL" in note for note in decoded.notes)


@pytest.mark.parametrize(
    ("attribute", "value", "reason"),
    [
        ("NumberOfFrames", "SECRET", dicom_rejections.UNREADABLE),
        (
            "PhotometricInterpretation",
            "HSV",
            dicom_rejections.UNSUPPORTED_IMAGE,
        ),  # pydicom decodes it
        (
            "PhotometricInterpretation",
            "SECRET",
            dicom_rejections.DECODE_FAILED,
        ),  # pydicom refuses it
    ],
)
def test_a_rejection_never_quotes_the_attribute_value(
    attribute: str, value: str, reason: str
) -> None:
    ds = make_mono_dataset(RAMP)
    # A raw element: pydicom would refuse a non-number NumberOfFrames through setattr.
    ds[attribute] = pydicom.DataElement(tag_for_keyword(attribute), "CS", value)
    with pytest.raises(dicom_rejections.DicomRejected) as err:
        dicom_io.decode_dataset(ds)
    assert err.value.reason == reason
    assert value.lower() not in str(err.value).lower()
