"""Decoding one DICOM file into display-space grayscale (or, asked for, RGB) frames.

:func:`decode_file` reads a file (:func:`tasks.data.dicom_read.read_dataset`) and
:func:`decode_dataset` decodes it: the size guards run first (:mod:`tasks.data.dicom_guards`),
then the wanted frames are decoded (a multi-frame image in ``middle`` mode has only its middle
frame decoded) and each goes through the DICOM grayscale pipeline
(:func:`tasks.data.dicom_display.to_display`). The result is float32 in [0, 1], shape
``(frames, rows, columns)``, with a list of notes saying what was applied.

Every way a file can fail is a :class:`tasks.data.dicom_rejections.DicomRejected` with a short
``reason`` code, so that the ingestion stage can put the file in its quarantine report instead of
crashing. Importing this module silences pydicom's logger and warnings (through
:mod:`tasks.data.dicom_read`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array

from tasks.config import MULTIFRAME_MODES
from tasks.data import dicom_guards
from tasks.data.dicom_display import to_display
from tasks.data.dicom_guards import MAX_IMAGE_DIM, number_of_frames
from tasks.data.dicom_read import patient_key, read_dataset
from tasks.data.dicom_rejections import (
    DECODE_FAILED,
    NO_PIXEL_DATA,
    UNSUPPORTED_TRANSFER_SYNTAX,
    DicomRejected,
)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class DecodedImage:
    """Display-space frames of one DICOM file plus the identifiers ingestion needs.

    Attributes:
        frames: float32 array ``(n_frames, rows, columns)`` with values in [0, 1], or
            ``(n_frames, rows, columns, 3)`` RGB for a colour image decoded with ``colour``.
        notes: what the decoder applied, e.g. ``["rescale", "window", "monochrome1_inverted"]``.
        sop_instance_uid: the file's SOPInstanceUID ("" when absent).
        patient_key: PatientID (or a fallback identity) used only to derive a salted hash.
    """

    frames: np.ndarray
    notes: list[str] = field(default_factory=list)
    sop_instance_uid: str = ""
    patient_key: str = ""


def decode_dataset(
    ds: Dataset,
    multiframe: str = "middle",
    max_image_dim: int | None = MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
    colour: bool = False,
) -> DecodedImage:
    """Decode the pixel data of ``ds`` into display-space frames (colour ones kept RGB when
    ``colour``, else made luma).

    Args:
        ds: a dataset from :func:`tasks.data.dicom_read.read_dataset`.
        multiframe: ``middle`` keeps the middle frame of a multi-frame image, ``all`` keeps all.
        max_image_dim: the largest rows or columns decoded (None: no limit); the frames to
            decode must also fit ``max_decoded_bytes`` (None:
            :func:`tasks.data.dicom_guards.decoded_bytes_limit`),
            checked on the header and on each compressed frame's own header first.

    Returns:
        The decoded image; see :class:`DecodedImage`.

    Raises:
        DicomRejected: no pixel data, unsupported transfer syntax or image type, or pixel data
            that does not decode (truncated, corrupt); ``too_large`` over the limits.
    """
    if multiframe not in MULTIFRAME_MODES:
        raise ValueError(f"multiframe must be one of {MULTIFRAME_MODES}, not {multiframe!r}")
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise DicomRejected(NO_PIXEL_DATA, "the file has no Pixel Data element (not an image)")
    _check_transfer_syntax(ds)

    n_frames = number_of_frames(ds)
    frame_indices = list(range(n_frames)) if multiframe == "all" else [n_frames // 2]
    notes = [f"frames:{n_frames}->{len(frame_indices)}"] if n_frames > 1 else []
    # Decoders allocate what the header declares, and a compressed frame's decoder what its
    # codestream declares: check both before any of them runs.
    dicom_guards.check_image_size(ds, max_image_dim, len(frame_indices), max_decoded_bytes)
    dicom_guards.check_codestream(ds, frame_indices, max_image_dim, max_decoded_bytes)

    pixels = _decode_pixels(ds, n_frames, frame_indices)
    frames = [
        to_display(frame, ds, index, notes, colour)
        for frame, index in zip(pixels, frame_indices, strict=True)
    ]
    del pixels  # the stored values are no longer needed: free them before stacking
    # One frame needs no stacked copy (an 8000 x 8000 float32 frame is 244 MiB).
    stacked = frames[0][np.newaxis] if len(frames) == 1 else np.stack(frames)
    return DecodedImage(
        frames=stacked.astype(np.float32, copy=False),
        notes=list(dict.fromkeys(notes)),  # de-duplicate, keep order
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        patient_key=patient_key(ds),
    )


def decode_file(
    path: str | Path,
    multiframe: str = "middle",
    max_image_dim: int | None = MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
    colour: bool = False,
) -> DecodedImage:
    """:func:`read_dataset` then :func:`decode_dataset`, both bounded by ``max_image_dim``
    (and the decoding by ``max_decoded_bytes``)."""
    return decode_dataset(
        read_dataset(path, max_image_dim), multiframe, max_image_dim, max_decoded_bytes, colour
    )


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
            UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder for transfer syntax {_uid_name(tsyntax)}"
        ) from err
    if not decoder.is_available:
        raise DicomRejected(
            UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {_uid_name(tsyntax)} needs a decoding plugin that is not installed",
        )


def _uid_name(uid: pydicom.uid.UID) -> str:
    """A standard UID's registered name; anything else (which may be any text from the file)
    is not quoted."""
    return uid.name if uid.is_valid and uid.name != str(uid) else "(not a registered UID)"


def _samples(ds: Dataset) -> int:
    return int(ds.get("SamplesPerPixel", 1) or 1)
