"""Decoding one PNG, JPEG or TIFF file into a display-space frame, pixels only.

An image folder (``data.source`` a folder of PNG / JPEG / TIFF files with a labels CSV, or in
class sub-folders) is read file by file here, the way :mod:`tasks.data.dicom_io` reads DICOM:
the size its header declares is checked before any pixel is decoded (PNG's IHDR and JPEG's
SOF through :mod:`tasks.data.codestream`, TIFF's first directory through Pillow's lazy open),
against the same limits as DICOM (``max_image_dim``, :func:`tasks.data.dicom_guards.decoded_bytes_limit`),
and every way a file can fail is a :class:`tasks.data.dicom_rejections.DicomRejected` with the
same reason codes, so ingestion quarantines it exactly as it quarantines a DICOM file.

Only the pixels leave this module: EXIF, XMP, ICC profiles, PNG text chunks and TIFF tags are
never read into a frame, a note or a reply (a file's metadata can carry a patient's name).
The service's PNG route (:func:`tasks.model.inference.prepare_png`) converts with
:func:`to_display`, so a served PNG is prepared exactly as an ingested one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tasks.data import codestream
from tasks.data.dicom_guards import MAX_IMAGE_DIM, decoded_bytes_limit
from tasks.data.dicom_rejections import (
    DECODE_FAILED,
    TOO_LARGE,
    UNREADABLE,
    UNSUPPORTED_IMAGE,
    DicomRejected,
)
from tasks.data.preprocess import luma, uint8_to_display

TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
# Pillow's format names, by what the file starts with (never by its name's suffix).
FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
# Room for metadata in a file whose pixels fill the decoding budget (1 MiB).
FILE_SLACK_BYTES = 2**20


def image_format(head: bytes) -> str | None:
    """``png``, ``jpeg`` or ``tiff`` for a file starting with ``head`` (its first 8 bytes or
    more); None for anything else (a DICOM file, say)."""
    if head.startswith(codestream.PNG_SIGNATURE):
        return "png"
    if head.startswith(codestream.JPEG_SOI):
        return "jpeg"
    if head.startswith(TIFF_SIGNATURES):
        return "tiff"
    return None


def file_format(path: Path) -> str | None:
    """:func:`image_format` of the file at ``path``; None when it cannot be read or is a DICOM
    file (``DICM`` after its 128-byte preamble, which PS3.10 lets hold a TIFF header)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    return head_format(head)


def head_format(head: bytes) -> str | None:
    """:func:`file_format` of a file whose first 132 bytes (or all, when fewer) are ``head``."""
    return None if head[128:132] == b"DICM" else image_format(head)


def stored_side(path: Path) -> int | None:
    """``min(height, width)`` of a PNG / JPEG / TIFF file as its header declares it (no pixel
    is decoded); None for another file or one whose header does not parse."""
    from PIL import Image

    kind = file_format(path)
    if kind is None:
        return None
    try:
        with Image.open(path, formats=[FORMATS[kind]]) as image:
            return min(image.size)
    except Exception:  # a corrupt header says nothing of the size
        return None


def decode_image_file(
    path: Path,
    max_image_dim: int = MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
    colour: bool = False,
) -> np.ndarray:
    """One PNG / JPEG / TIFF file → float32 [0, 1] ``(H, W)``, or ``(H, W, 3)`` RGB for a
    colour file when ``colour`` (else its ITU-R BT.601 luma, as for DICOM).

    Raises:
        DicomRejected: ``unreadable`` (the file cannot be read or its header does not parse),
            ``too_large`` (rows or columns above ``max_image_dim``, or more decoded bytes than
            ``max_decoded_bytes``, None: :func:`decoded_bytes_limit`; a file over twice that), ``unsupported_image``
            (a multi-page TIFF, a pixel format with no display rule), ``decode_failed``.
    """
    budget = decoded_bytes_limit(max_image_dim) if max_decoded_bytes is None else max_decoded_bytes
    try:
        # Compressed image data is not larger than its pixels (deflate and JPEG add little):
        # a file twice the budget is refused before it is read into memory.
        if path.stat().st_size > 2 * budget + FILE_SLACK_BYTES:
            raise DicomRejected(TOO_LARGE, "the file is larger than the decoder accepts")
        data = path.read_bytes()
    except OSError as err:
        raise DicomRejected(UNREADABLE, f"the file cannot be read ({type(err).__name__})") from err
    return decode_image_bytes(data, max_image_dim, budget, colour)


def decode_image_bytes(
    data: bytes,
    max_image_dim: int = MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
    colour: bool = False,
) -> np.ndarray:
    """:func:`decode_image_file` for a file's bytes already in memory (an archive member,
    :mod:`tasks.data.archives`): same result, same limits, same reasons."""
    from PIL import Image

    budget = decoded_bytes_limit(max_image_dim) if max_decoded_bytes is None else max_decoded_bytes
    if len(data) > 2 * budget + FILE_SLACK_BYTES:
        raise DicomRejected(TOO_LARGE, "the file is larger than the decoder accepts")
    kind = image_format(data[:8])
    if kind is None:
        raise DicomRejected(UNREADABLE, "the file is not a PNG, JPEG or TIFF image")
    if kind != "tiff":  # read before Pillow sees the file: it allocates what these declare
        _check_declared(_declared(data, kind), max_image_dim, budget)
    try:
        image = Image.open(io.BytesIO(data), formats=[FORMATS[kind]])
    except Image.DecompressionBombError as err:
        raise DicomRejected(TOO_LARGE, "the image is larger than the decoder accepts") from err
    except Exception as err:  # Pillow raises several types on a corrupt header
        raise DicomRejected(UNREADABLE, f"the {kind} header does not parse") from err
    if kind == "tiff":
        _check_tiff(image, max_image_dim, budget)
    try:
        image.load()
        frame = to_display(image)
    except DicomRejected:
        raise
    except Exception as err:
        raise DicomRejected(DECODE_FAILED, f"the {kind} pixel data does not decode") from err
    return frame if colour or frame.ndim == 2 else luma(frame)


def _declared(data: bytes, kind: str) -> codestream.DeclaredSize:
    try:
        return codestream.png_size(data) if kind == "png" else codestream.jpeg_size(data)
    except codestream.CodestreamError as err:
        raise DicomRejected(UNREADABLE, f"the {kind} header does not parse") from err


def _check_declared(declared: codestream.DeclaredSize, max_image_dim: int, budget: int) -> None:
    if max(declared.rows, declared.columns) > max_image_dim or declared.decoded_bytes > budget:
        raise DicomRejected(TOO_LARGE, "the image is larger than the decoder accepts")


def _check_tiff(image, max_image_dim: int, budget: int) -> None:
    """A TIFF's first directory, as Pillow's lazy open read it: one page, within the limits."""
    if getattr(image, "n_frames", 1) > 1:
        raise DicomRejected(UNSUPPORTED_IMAGE, "a multi-page TIFF; save each page as a file")
    width, height = image.size
    bands = len(image.getbands())
    bytes_per_sample = 4 if image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    declared = codestream.DeclaredSize(height, width, bands, 8 * bytes_per_sample, "tiff")
    _check_declared(declared, max_image_dim, budget)


def to_display(image) -> np.ndarray:
    """A loaded Pillow image → float32 [0, 1] grayscale ``(H, W)`` or RGB ``(H, W, 3)``.

    8-bit gray and RGB are divided by 255 (:func:`tasks.data.preprocess.uint8_to_display`),
    16-bit gray by 65535; palette images take their palette's colours, alpha is dropped, a
    gray image with alpha keeps its gray channel, CMYK and YCbCr JPEGs become RGB.

    The EXIF orientation (JPEG's APP1, PNG's ``eXIf``, TIFF's tag 274) is applied first, as
    every viewer applies it: a photograph stored sideways with "rotate 90" is learnt and served
    upright. The tag is read, never copied anywhere.

    Raises:
        DicomRejected: ``unsupported_image`` for a pixel format with no rule here (float TIFF).
    """
    image = upright(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image, dtype=np.float32) / np.float32(65535.0)
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    array = np.asarray(image)
    if array.ndim == 3:
        if array.shape[2] in (3, 4):  # RGB, RGBA: drop alpha
            return uint8_to_display(array[..., :3])
        array = array[..., 0]  # LA: the grey channel
    if array.dtype != np.uint8 or array.ndim != 2:
        raise DicomRejected(UNSUPPORTED_IMAGE, "a pixel format with no display rule")
    return uint8_to_display(array)


# EXIF tag 274: how the stored pixels must be turned to be seen upright (1: as stored).
ORIENTATION_TAG = 0x0112


def upright(image):
    """A loaded Pillow image turned as its EXIF orientation says; the image itself when it has
    no orientation or orientation 1 (no copy). Transposition is exact: no pixel is resampled."""
    from PIL import ImageOps

    if image.getexif().get(ORIENTATION_TAG, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)
