"""Stored pixel values of one frame → display-space grayscale in [0, 1].

The DICOM grayscale pipeline (PS3.4 N.2): stored values → modality LUT (Rescale
Slope/Intercept or a Modality LUT) → VOI LUT or window (VOI LUT Function LINEAR, LINEAR_EXACT or
SIGMOID) → inversion for MONOCHROME1 or Presentation LUT Shape INVERSE (once). Colour images
(RGB, YBR converted to RGB by pydicom, PALETTE COLOR through pydicom's ``apply_color_lut``)
become luminance, or stay RGB ``(rows, columns, 3)`` when ``colour`` is asked for. :func:`to_display` runs it on one frame and records
each step it applied in a list of notes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

from tasks.data.dicom_rejections import UNSUPPORTED_IMAGE, DicomRejected

# VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3: LINEAR when absent.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def to_display(
    frame: np.ndarray, ds: Dataset, index: int, notes: list[str], colour: bool = False
) -> np.ndarray:
    """One stored frame → float32 [0, 1] grayscale ``(rows, columns)``, recording each step in
    ``notes``; with ``colour`` a colour frame stays RGB ``(rows, columns, 3)`` instead."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        scale = max(float(rgb.max()), 1.0)
        if colour:
            notes.append("palette_to_rgb")
            return (rgb.astype(np.float32) / np.float32(scale)).astype(np.float32)
        notes.append("palette_to_gray")
        return _luminance(rgb) / scale
    if frame.ndim == 3:  # RGB (pydicom converts YBR to RGB by default)
        bits = int(ds.get("BitsStored", 8) or 8)
        if colour:
            notes.append("rgb" if photometric == "RGB" else "ybr_to_rgb")
            return frame.astype(np.float32) / np.float32(2**bits - 1)
        notes.append("rgb_to_gray")
        return _luminance(frame) / float(2**bits - 1)
    if not photometric.startswith("MONOCHROME"):
        # The value itself stays out of the message: it may be any bytes from a broken file.
        raise DicomRejected(UNSUPPORTED_IMAGE, "the photometric interpretation is not supported")

    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
        notes.append("modality_lut")
    else:
        # Rescale in float32, in place: pydicom's apply_modality_lut works in float64, which
        # is twice the memory traffic for no visible gain in an 8-bit result.
        values = frame.astype(np.float32)
        slope, intercept = _rescale_coefficients(ds)
        if (slope, intercept) != (1.0, 0.0) or "RescaleSlope" in ds:
            values *= np.float32(slope)
            values += np.float32(intercept)
            notes.append("rescale")
    display = _apply_voi(values, ds, index, notes)
    return _apply_presentation_shape(display, ds, photometric, notes)


def _apply_presentation_shape(
    display: np.ndarray, ds: Dataset, photometric: str, notes: list[str]
) -> np.ndarray:
    """VOI output in [0, 1] → P-values in [0, 1] (0 black): inverted or left as it is.

    MONOCHROME1 means the minimum value is shown white, so its VOI output is inverted.
    Presentation LUT Shape (2050,0020) INVERSE (PS3.3 C.11.6.1.2) inverts too. The standard
    asks for INVERSE exactly when the image is MONOCHROME1 (e.g. PS3.3 C.8.11.3, DX Image):
    both name the same single inversion, so MONOCHROME1 with INVERSE is inverted once, not
    twice. IDENTITY never undoes MONOCHROME1: a MONOCHROME1 image that says IDENTITY breaks
    that rule, and the photometric interpretation, which every image must have, is trusted.
    Any other shape (not defined by the standard) is ignored and noted.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape not in ("", "IDENTITY", "INVERSE"):
        notes.append("presentation_lut_shape_unknown")
    if photometric == "MONOCHROME1":
        notes.append("monochrome1_inverted")
    elif shape == "INVERSE":
        notes.append("presentation_lut_inverted")
    else:
        return display
    # 1 - x over the whole output range [0, 1] (not over the image's own maximum, which
    # pydicom's apply_presentation_lut uses): a window's saturated end stays 0 or 1.
    return 1.0 - display


def _apply_voi(values: np.ndarray, ds: Dataset, index: int, notes: list[str]) -> np.ndarray:
    """Modality values → [0, 1] through the VOI LUT, the window, or the image's own range."""
    if "VOILUTSequence" in ds:
        try:
            # A LUT is indexed by integer input values.
            lut_out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float32)
            lut_data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32)
            notes.append("voi_lut")
            return _rescale(lut_out, float(lut_data.min()), float(lut_data.max()))
        except Exception:  # a malformed LUT falls back to the window or the range
            notes.append("voi_lut_invalid")
    window = _window(ds, index)
    if window is not None:
        center, width, function = window
        if function == "SIGMOID":
            notes.append("window_sigmoid")
            return window_sigmoid(values, center, width)
        if function == "LINEAR_EXACT":
            notes.append("window_linear_exact")
            return window_linear_exact(values, center, width)
        if function not in VOI_LUT_FUNCTIONS:
            notes.append("voi_lut_function_unknown")  # the standard's default stands in
        notes.append("window")
        return window_linear(values, center, width)
    notes.append("minmax")
    return _rescale(values, float(values.min()), float(values.max()))


def _window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """The first (Window Center, Window Width) pair and the VOI LUT Function that goes with it.

    The three come from the frame's Frame VOI LUT functional group when there is one, else the
    shared group, else the top level. Returns ``(center, width, function)`` with ``function``
    upper-case (``LINEAR`` when absent; an undefined value is passed on for the caller to note),
    or None when there is no usable window: LINEAR needs a width of at least 1, LINEAR_EXACT
    and SIGMOID a width above 0 (PS3.3 C.11.2.1.2.1, C.11.2.1.3).
    """
    source: Dataset = ds
    if "PerFrameFunctionalGroupsSequence" in ds:
        try:
            group = ds.PerFrameFunctionalGroupsSequence[index]
            source = group.FrameVOILUTSequence[0]
        except (AttributeError, IndexError):
            source = ds
    if "SharedFunctionalGroupsSequence" in ds and "WindowCenter" not in source:
        with contextlib.suppress(AttributeError, IndexError):
            source = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(source.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    minimum_ok = width > 0 if function in ("LINEAR_EXACT", "SIGMOID") else width >= 1
    return (center, width, function) if minimum_ok and np.isfinite([center, width]).all() else None


# Why these three functions and not pydicom.pixels.apply_windowing: that function reads the
# window from the dataset's top level and scales its output to the stored bit range, while
# ingestion windows each frame with its own Frame VOI LUT values (functional groups, above)
# and wants [0, 1] as float32 without a float64 copy of a large multi-frame image. The result
# is the same: tests/test_dicom_pydicom3.py compares all three with apply_windowing on a
# 12-bit ramp; the largest difference measured is 1.9e-7 (LINEAR_EXACT; LINEAR 1.8e-7,
# SIGMOID 2.9e-8), float32 rounding.
def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR window function (PS3.3 C.11.2.1.2.1) with output range [0, 1].

    Values at or below ``center - 0.5 - (width - 1) / 2`` map to 0, values above
    ``center - 0.5 + (width - 1) / 2`` map to 1, linear in between. Returns a new float32
    array; the input is left alone.
    """
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    # (x - (c - 0.5)) / (w - 1) + 0.5 as one multiply and one add, in place on a float32 copy.
    out = np.array(values, dtype=np.float32)
    out *= np.float32(1.0 / (width - 1))
    out += np.float32(0.5 - (center - 0.5) / (width - 1))
    return np.clip(out, 0.0, 1.0, out=out)


def window_linear_exact(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR_EXACT window function (PS3.3 C.11.2.1.3.2) with output range [0, 1].

    ``(x - center) / width + 0.5`` clipped to [0, 1]: values at or below ``center - width / 2``
    map to 0, values above ``center + width / 2`` map to 1. ``width`` must be above 0. Returns
    a new float32 array; the input is left alone.
    """
    out = np.array(values, dtype=np.float32)
    out *= np.float32(1.0 / width)
    out += np.float32(0.5 - center / width)
    return np.clip(out, 0.0, 1.0, out=out)


def window_sigmoid(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM SIGMOID window function (PS3.3 C.11.2.1.3.1) with output range [0, 1].

    ``1 / (1 + exp(-4 (x - center) / width))``; ``width`` must be above 0. Returns a new
    float32 array; the input is left alone.
    """
    # The same curve written as 0.5 (1 + tanh(2 (x - c) / w)): tanh cannot overflow where exp
    # of a large argument would (values far below the center).
    out = np.array(values, dtype=np.float64)
    out -= center
    out *= 2.0 / width
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out.astype(np.float32)


def _rescale_coefficients(ds: Dataset) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept), defaulting to (1, 0) when absent or malformed."""
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, intercept


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(values - low) / (high - low)`` clipped to [0, 1], as one new float32 array.

    Computed in place on that array: three temporaries of an 8000 x 8000 image were 730 MiB.
    """
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    out = np.subtract(values, low, dtype=np.float32)
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an ``(..., 3)`` array, as float32.

    Channel by channel: a float32 copy of the whole RGB array would be twice the size of a
    16-bit image (1.5 GB for 8192 x 8192 x 3).
    """
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    luma = rgb[..., 0].astype(np.float32)
    luma *= weights[0]
    for channel in (1, 2):
        luma += rgb[..., channel].astype(np.float32) * weights[channel]
    return luma
