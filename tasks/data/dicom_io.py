"""Decoding one DICOM file into display-space grayscale frames.

The pipeline follows the DICOM grayscale pipeline (PS3.4 N.2): stored values → modality LUT
(Rescale Slope/Intercept or a Modality LUT) → VOI LUT or window (VOI LUT Function LINEAR,
LINEAR_EXACT or SIGMOID) → inversion for MONOCHROME1 or Presentation LUT Shape INVERSE (once).
A multi-frame image in ``middle`` mode has only its middle frame decoded. Colour images (RGB, YBR, PALETTE COLOR) become luminance. The result is float32 in [0, 1],
shape ``(frames, rows, columns)``, with a list of notes saying what was applied.

Every way a file can fail is a :class:`DicomRejected` with a short ``reason`` code, so that the
ingestion stage can put the file in its quarantine report instead of crashing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    get_decoder,
    pixel_array,
)

from tasks.config import MULTIFRAME_MODES

# Quarantine reason codes (the `reason` column of quarantine.csv).
NOT_DICOM = "not_dicom"
UNREADABLE = "unreadable"
NO_PIXEL_DATA = "no_pixel_data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
UNSUPPORTED_IMAGE = "unsupported_image"
DECODE_FAILED = "decode_failed"

# VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3: LINEAR when absent.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomRejected(Exception):
    """A file that cannot become an image; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    """Display-space frames of one DICOM file plus the identifiers ingestion needs.

    Attributes:
        frames: float32 array ``(n_frames, rows, columns)`` with values in [0, 1].
        notes: what the decoder applied, e.g. ``["rescale", "window", "monochrome1_inverted"]``.
        sop_instance_uid: the file's SOPInstanceUID ("" when absent).
        patient_key: PatientID (or a fallback identity) used only to derive a salted hash.
    """

    frames: np.ndarray
    notes: list[str] = field(default_factory=list)
    sop_instance_uid: str = ""
    patient_key: str = ""


def read_dataset(path: str | Path | BinaryIO) -> Dataset:
    """Read a DICOM file's header and pixel data bytes (not yet decoded).

    ``path`` may also be a seekable binary stream (an upload held in memory); it is read from
    its start.

    Raises:
        DicomRejected: ``not_dicom`` without a DICOM preamble/header, ``unreadable`` when the
            header is truncated or corrupt.
    """
    _rewind(path)
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble or File Meta: maybe an old ACR-NEMA style file; try below
    except Exception as err:  # pydicom raises many types on corrupt headers
        raise DicomRejected(
            # The error's type only: pydicom's text may quote an element's value.
            UNREADABLE,
            f"header could not be parsed ({type(err).__name__})",
        ) from err
    # Without the 'DICM' prefix any bytes "parse"; accept the result only if it looks like
    # an image or a SOP instance.
    try:
        _rewind(path)  # a stream is left where the first attempt stopped
        ds = pydicom.dcmread(path, force=True)
        looks_like_dicom = "PixelData" in ds or "SOPClassUID" in ds
    except Exception:
        looks_like_dicom = False
    if not looks_like_dicom:
        raise DicomRejected(
            NOT_DICOM, "not a DICOM file (no DICOM header, no image or SOP elements)"
        )
    ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        # pydicom found the encoding while reading; record it so the pixel decoders know it.
        ds.file_meta.TransferSyntaxUID = _transfer_syntax_of_encoding(*ds.original_encoding)
    return ds


def _transfer_syntax_of_encoding(
    implicit_vr: bool | None, little_endian: bool | None
) -> pydicom.uid.UID:
    """The uncompressed transfer syntax of a dataset's ``original_encoding``.

    Takes the pair pydicom records while reading (implicit VR?, little endian?) and returns
    Implicit VR Little Endian, Explicit VR Little Endian or Explicit VR Big Endian. ``None``
    (never read from bytes) counts as pydicom's own default, implicit VR little endian.
    """
    # Reading the pair through Dataset.original_encoding, not the is_implicit_VR and
    # is_little_endian attributes: those are deprecated in pydicom 3 and gone in pydicom 4.
    if implicit_vr is None or implicit_vr:
        return pydicom.uid.ImplicitVRLittleEndian
    if little_endian is None or little_endian:
        return pydicom.uid.ExplicitVRLittleEndian
    return pydicom.uid.ExplicitVRBigEndian


def _rewind(source: str | Path | BinaryIO) -> None:
    if hasattr(source, "seek"):
        source.seek(0)


def patient_key(ds: Dataset) -> str:
    """The identity used to keep one patient in one split.

    PatientID when present; otherwise the StudyInstanceUID, so that images of one study stay
    together; otherwise the SOPInstanceUID (the image is its own patient).
    """
    for keyword in ("PatientID", "StudyInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return f"{keyword}:{value}"
    return ""


def decode_dataset(ds: Dataset, multiframe: str = "middle") -> DecodedImage:
    """Decode the pixel data of ``ds`` into display-space frames.

    Args:
        ds: a dataset from :func:`read_dataset`.
        multiframe: ``middle`` keeps the middle frame of a multi-frame image, ``all`` keeps all.

    Returns:
        The decoded image; see :class:`DecodedImage`.

    Raises:
        DicomRejected: no pixel data, unsupported transfer syntax or image type, or pixel data
            that does not decode (truncated, corrupt).
    """
    if multiframe not in MULTIFRAME_MODES:
        raise ValueError(f"multiframe must be one of {MULTIFRAME_MODES}, not {multiframe!r}")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise DicomRejected(NO_PIXEL_DATA, "the file has no Pixel Data element (not an image)")
    _check_transfer_syntax(ds)

    n_frames = _number_of_frames(ds)
    frame_indices = list(range(n_frames)) if multiframe == "all" else [n_frames // 2]
    notes = [f"frames:{n_frames}->{len(frame_indices)}"] if n_frames > 1 else []

    pixels = _decode_pixels(ds, n_frames, frame_indices)
    frames = [
        _to_display(frame, ds, index, notes)
        for frame, index in zip(pixels, frame_indices, strict=True)
    ]
    return DecodedImage(
        frames=np.stack(frames).astype(np.float32, copy=False),
        notes=list(dict.fromkeys(notes)),  # de-duplicate, keep order
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        patient_key=patient_key(ds),
    )


def decode_file(path: str | Path, multiframe: str = "middle") -> DecodedImage:
    """:func:`read_dataset` then :func:`decode_dataset`."""
    return decode_dataset(read_dataset(path), multiframe=multiframe)


def _decode_pixels(ds: Dataset, n_frames: int, frame_indices: list[int]) -> np.ndarray:
    """Decode the stored frames ``frame_indices`` of ``ds`` (``n_frames`` in all).

    Returns an array ``(len(frame_indices), rows, columns[, samples])`` of stored values
    (YBR already converted to RGB, as pydicom does by default).

    Raises:
        DicomRejected: ``decode_failed`` when the pixel data does not decode.
    """
    try:
        if n_frames > 1 and len(frame_indices) == 1:
            # One frame of many: pydicom 3 decodes just that frame (only its bytes, or only its
            # fragments when compressed), so a large volume never becomes one array here.
            return pixel_array(ds, index=frame_indices[0])[np.newaxis]
        # pydicom.pixels.pixel_array rather than Dataset.pixel_array: the property goes through
        # Dataset.convert_pixel_data, which is deprecated in pydicom 3 and gone in pydicom 4.
        pixels = pixel_array(ds)
    except Exception as err:  # decoders raise ValueError, RuntimeError, ... on bad data
        raise DicomRejected(
            # The error's type only: decoders' texts quote element values.
            DECODE_FAILED,
            f"pixel data does not decode ({type(err).__name__})",
        ) from err
    except BaseException as err:
        if not is_decoder_panic(err):
            raise
        # A Rust decoder (pylibjpeg-rle) panics on some corrupt streams; pyo3 raises that as a
        # PanicException, which is not an Exception, and would otherwise kill the caller.
        raise DicomRejected(DECODE_FAILED, "pixel data does not decode (decoder panic)") from err
    if pixels.ndim == 2 or (pixels.ndim == 3 and n_frames == 1 and _samples(ds) > 1):
        pixels = pixels[np.newaxis]  # one frame: make the frame axis explicit
    # Here every frame is wanted (``all``, or a single-frame image), in order.
    if pixels.shape[0] != len(frame_indices):
        raise DicomRejected(DECODE_FAILED, "the decoded frames do not match Number of Frames")
    return pixels


def is_decoder_panic(error: BaseException) -> bool:
    """Whether ``error`` is a compiled decoder's panic (pyo3's ``PanicException``, which
    derives from ``BaseException``), as opposed to an interrupt or an exit."""
    return type(error).__name__ == "PanicException" and not isinstance(
        error, KeyboardInterrupt | SystemExit | GeneratorExit
    )


def _check_transfer_syntax(ds: Dataset) -> None:
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        return  # implicit VR little endian assumed by pydicom; decodes natively
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as err:
        raise DicomRejected(
            UNSUPPORTED_TRANSFER_SYNTAX,
            f"no decoder for transfer syntax {tsyntax.name} ({tsyntax})",
        ) from err
    if not decoder.is_available:
        raise DicomRejected(
            UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {tsyntax.name} needs a decoding plugin that is not installed",
        )


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError) as err:
        # Not the parser's text: it would quote the value.
        raise DicomRejected(UNREADABLE, "Number of Frames is not a number") from err


def _samples(ds: Dataset) -> int:
    return int(ds.get("SamplesPerPixel", 1) or 1)


def _to_display(frame: np.ndarray, ds: Dataset, index: int, notes: list[str]) -> np.ndarray:
    """One stored frame → float32 [0, 1] grayscale, recording each step in ``notes``."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        notes.append("palette_to_gray")
        rgb = apply_color_lut(frame, ds)
        return _luminance(rgb) / max(float(rgb.max()), 1.0)
    if frame.ndim == 3:  # RGB (pydicom converts YBR to RGB by default)
        notes.append("rgb_to_gray")
        bits = int(ds.get("BitsStored", 8) or 8)
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
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an ``(..., 3)`` array, as float32."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return rgb.astype(np.float32) @ weights
