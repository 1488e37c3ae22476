"""The size guards of DICOM decoding: what a header or a compressed frame may declare.

Decoders allocate what they are told: pydicom what the DICOM header declares, a compressed
frame's decoder what its own codestream header declares. So before any of them runs, an image's
rows and columns may not exceed ``max_image_dim``, the frames to decode may not exceed
:func:`decoded_bytes_limit` (or the caller's ``max_decoded_bytes``) (:func:`check_image_size`),
and a compressed frame's own header must declare the image the DICOM header does
(:func:`check_codestream`, reading headers through :mod:`tasks.data.codestream`).
"""

from __future__ import annotations

import pydicom
import pydicom.encaps
from pydicom.dataset import Dataset

from tasks.data import codestream
from tasks.data.dicom_rejections import DECODE_FAILED, TOO_LARGE, UNREADABLE, DicomRejected

# The largest rows or columns decoded unless the caller says otherwise (serving.max_image_dim's
# default; ingestion uses it).
MAX_IMAGE_DIM = 8192


def decoded_bytes_limit(max_image_dim: int) -> int:
    """The most bytes of stored pixel values decoded at once: one 16-bit grayscale image of
    ``max_image_dim`` x ``max_image_dim`` (128 MiB at 8192). Colour or multi-frame data of
    that size are refused: decoding 8192 x 8192 x 3 16-bit samples alone took 1.5 GB."""
    return max_image_dim * max_image_dim * 2


def check_image_size(
    ds: Dataset,
    max_image_dim: int | None,
    frames: int | None = 1,
    max_decoded_bytes: int | None = None,
) -> int:
    """The stored pixel bytes ``frames`` frames of ``ds`` decode to (None: every frame), from
    its header: rows x columns x samples x bytes per sample x frames.

    Raises:
        DicomRejected: ``too_large`` when rows or columns exceed ``max_image_dim`` or the bytes
            exceed ``max_decoded_bytes`` (None: :func:`decoded_bytes_limit`); ``unreadable``
            when a size is not a number.
    """
    rows, columns = header_int(ds, "Rows", 0), header_int(ds, "Columns", 0)
    samples = header_int(ds, "SamplesPerPixel", 1)
    bits = header_int(ds, "BitsAllocated", 8)
    count = number_of_frames(ds) if frames is None else frames
    size = max(rows, 0) * max(columns, 0) * max(samples, 1) * max((bits + 7) // 8, 1) * count
    if max_image_dim is None:
        return size
    budget = decoded_bytes_limit(max_image_dim) if max_decoded_bytes is None else max_decoded_bytes
    if max(rows, columns) > max_image_dim or size > budget:
        raise DicomRejected(TOO_LARGE, "the image is larger than the decoder accepts")
    return size


# Transfer syntaxes whose frames carry their own size: JPEG (SOFn), JPEG-LS (SOF55), JPEG 2000
# and HTJ2K (SIZ).
_SIZED_CODESTREAMS = frozenset(
    pydicom.uid.JPEGTransferSyntaxes
    + pydicom.uid.JPEGLSTransferSyntaxes
    + pydicom.uid.JPEG2000TransferSyntaxes
)


def check_codestream(
    ds: Dataset,
    frame_indices: list[int],
    max_image_dim: int | None,
    max_decoded_bytes: int | None = None,
) -> None:
    """Refuse a compressed frame whose own header declares another image than ``ds``'s header.

    For JPEG, JPEG-LS and JPEG 2000 transfer syntaxes each frame in ``frame_indices`` has its
    codestream header read (:mod:`tasks.data.codestream`; no pixel is decoded); for RLE the
    number of segments must be samples x bytes per sample. Other syntaxes pass unchecked.

    Raises:
        DicomRejected: ``too_large`` when a frame declares more rows or columns than the header
            or ``max_image_dim``, or more bytes than ``max_decoded_bytes`` (None:
            :func:`decoded_bytes_limit`); ``decode_failed`` when it declares a smaller or
            otherwise different image, or its header does not parse.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax not in _SIZED_CODESTREAMS and tsyntax != pydicom.uid.RLELossless:
        return
    n_frames = number_of_frames(ds)
    wanted = set(frame_indices)
    try:
        frames = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=n_frames)
        for index, frame in enumerate(frames):
            if index in wanted:
                _check_frame(ds, tsyntax, frame, max_image_dim, max_decoded_bytes)
            if index >= max(wanted):
                break
    except codestream.CodestreamError as err:
        raise DicomRejected(DECODE_FAILED, "a compressed frame's header does not parse") from err
    except DicomRejected:
        raise
    except Exception as err:  # pydicom's fragment parser on broken encapsulation
        raise DicomRejected(
            DECODE_FAILED, f"the compressed frames cannot be read ({type(err).__name__})"
        ) from err


def _check_frame(
    ds: Dataset,
    tsyntax: str,
    frame: bytes,
    max_image_dim: int | None,
    max_decoded_bytes: int | None,
) -> None:
    """One compressed frame's declared size against ``ds``'s header and the limits."""
    samples = header_int(ds, "SamplesPerPixel", 1)
    if tsyntax == pydicom.uid.RLELossless:
        bytes_per_sample = max((header_int(ds, "BitsAllocated", 8) + 7) // 8, 1)
        if codestream.rle_segments(frame) != samples * bytes_per_sample:
            raise DicomRejected(DECODE_FAILED, "the RLE segments do not match the header")
        return
    declared = codestream.declared_size(frame)
    if declared is None:
        raise DicomRejected(DECODE_FAILED, "a compressed frame is not of its transfer syntax")
    rows, columns = header_int(ds, "Rows", 0), header_int(ds, "Columns", 0)
    limit = max_image_dim if max_image_dim is not None else max(rows, columns)
    budget = max_decoded_bytes
    if budget is None and max_image_dim is not None:
        budget = decoded_bytes_limit(max_image_dim)
    if (
        declared.rows > rows
        or declared.columns > columns
        or max(declared.rows, declared.columns) > limit
        or (budget is not None and declared.decoded_bytes > budget)
    ):
        raise DicomRejected(TOO_LARGE, "a compressed frame declares a larger image than its header")
    if (declared.rows, declared.columns) != (rows, columns):
        raise DicomRejected(DECODE_FAILED, "a compressed frame's size differs from its header's")


def header_int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError) as err:
        # Not the parser's text: it would quote the value.
        raise DicomRejected(UNREADABLE, "an image size attribute is not a number") from err


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError, OverflowError) as err:
        # Not the parser's text: it would quote the value.
        raise DicomRejected(UNREADABLE, "Number of Frames is not a number") from err
