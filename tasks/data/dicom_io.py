"""Decoding one DICOM file into display-space grayscale frames.

The pipeline follows the DICOM grayscale pipeline (PS3.4 N.2): stored values → modality LUT
(Rescale Slope/Intercept or a Modality LUT) → VOI LUT or window (VOI LUT Function LINEAR,
LINEAR_EXACT or SIGMOID) → inversion for MONOCHROME1 or Presentation LUT Shape INVERSE (once).
A multi-frame image in ``middle`` mode has only its middle frame decoded. Colour images (RGB, YBR, PALETTE COLOR) become luminance. The result is float32 in [0, 1],
shape ``(frames, rows, columns)``, with a list of notes saying what was applied.

Every way a file can fail is a :class:`DicomRejected` with a short ``reason`` code, so that the
ingestion stage can put the file in its quarantine report instead of crashing. A rejection's
``detail`` is a sentence written here, never a decoder's text or an attribute's value.

Decoding is bounded: an image's rows and columns may not exceed ``max_image_dim``, the frames to
decode may not exceed :func:`decoded_bytes_limit` (or the caller's ``max_decoded_bytes``), a
compressed frame's own header must declare the image the DICOM header does
(:func:`check_codestream`: decoders allocate what the codestream says), and a Deflated Explicit VR Little Endian data
set is inflated with a bounded decompressor (:func:`read_dataset`) instead of pydicom's
unbounded ``zlib.decompress``: a 1 MB deflate bomb is refused (``too_large``) after inflating
at most its header's worth of pixel data.

Importing this module silences pydicom's logger and warnings (they quote attribute values, e.g.
``Invalid value for VR UI: '1.2.840...'``) and turns off pydicom's value validation on reading.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.config
import pydicom.encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    get_decoder,
    pixel_array,
)

from tasks.config import MULTIFRAME_MODES
from tasks.data import codestream

# After pydicom's import, which configures its logger: nothing pydicom says may reach a log,
# since its messages quote attribute values (UIDs, names, malformed values).
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Quarantine reason codes (the `reason` column of quarantine.csv).
NOT_DICOM = "not_dicom"
UNREADABLE = "unreadable"
NO_PIXEL_DATA = "no_pixel_data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
UNSUPPORTED_IMAGE = "unsupported_image"
DECODE_FAILED = "decode_failed"
TOO_LARGE = "too_large"

# The largest rows or columns decoded unless the caller says otherwise (serving.max_image_dim's
# default; ingestion uses it).
MAX_IMAGE_DIM = 8192
# A deflated data set's header (everything before Pixel Data) must inflate within this much.
DEFLATE_HEADER_PROBE = 4 * 1024 * 1024
# Room for elements after the pixel data (overlays, padding) in a deflated data set.
DEFLATE_SLACK = 1024 * 1024

# VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3: LINEAR when absent.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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


def read_dataset(path: str | Path | BinaryIO, max_image_dim: int | None = MAX_IMAGE_DIM) -> Dataset:
    """Read a DICOM file's header and pixel data bytes (not yet decoded).

    ``path`` may also be a seekable binary stream (an upload held in memory); it is read from
    its start. A deflated data set is inflated within the bound its own header declares (see
    :func:`_read_deflated`); ``max_image_dim`` (None: no limit) caps the rows and columns that
    bound may allow.

    Raises:
        DicomRejected: ``not_dicom`` without a DICOM preamble/header, ``unreadable`` when the
            header is truncated or corrupt, ``too_large`` when a deflated data set inflates to
            more than its header declares or than ``max_image_dim`` allows.
    """
    if _meta_transfer_syntax(path) == pydicom.uid.DeflatedExplicitVRLittleEndian:
        with _opened(path) as fp:
            return _read_deflated(fp, max_image_dim)
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


@contextlib.contextmanager
def _opened(source: str | Path | BinaryIO) -> Iterator[BinaryIO]:
    """A binary stream at the start of ``source``: the stream itself, or the file opened."""
    if hasattr(source, "read"):
        _rewind(source)
        yield source  # type: ignore[misc]
        return
    with open(source, "rb") as fp:
        yield fp


def _not_file_meta(tag, vr, length) -> bool:
    return tag.group != 2


def _read_file_meta(fp: BinaryIO) -> FileMetaDataset | None:
    """The File Meta group after a 128-byte preamble and ``DICM``, or None without them.

    Leaves ``fp`` at the start of the data set.
    """
    start = fp.read(132)
    if len(start) < 132 or start[128:] != b"DICM":
        return None
    try:
        meta = pydicom.filereader.read_dataset(fp, False, True, stop_when=_not_file_meta)
        return FileMetaDataset(meta)
    except Exception as err:
        raise DicomRejected(
            UNREADABLE, f"file meta information could not be parsed ({type(err).__name__})"
        ) from err


def _meta_transfer_syntax(source: str | Path | BinaryIO) -> str:
    """The File Meta's Transfer Syntax UID ("" when there is none); reads only the meta group."""
    with _opened(source) as fp:
        meta = _read_file_meta(fp)
    if meta is None:
        return ""
    try:
        return str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:  # a malformed value: pydicom's own reading decides below
        return ""


def _read_deflated(fp: BinaryIO, max_image_dim: int | None) -> Dataset:
    """A Deflated Explicit VR Little Endian file, inflated with a bound (PS3.5 A.5).

    The first :data:`DEFLATE_HEADER_PROBE` bytes are inflated and their header read up to the
    Pixel Data element; the rest may inflate to at most the pixel bytes that header declares
    (rows x columns x samples x bytes per sample x frames, each checked against
    ``max_image_dim``) plus :data:`DEFLATE_SLACK`. So memory stays within a few times the
    declared image, whatever the compressed stream holds.
    """
    meta = _read_file_meta(fp)
    assert meta is not None  # the caller found the Transfer Syntax in it
    zipped = fp.read()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = inflater.decompress(zipped, DEFLATE_HEADER_PROBE)
        header_end, declared = _deflated_header(head, max_image_dim)
        bound = header_end + declared + DEFLATE_SLACK
        # max_length 0 would mean "no limit": ask for at least one byte.
        rest = inflater.decompress(inflater.unconsumed_tail, max(bound - len(head), 0) + 1)
    except zlib.error as err:
        raise DicomRejected(UNREADABLE, "the deflated data set does not inflate") from err
    del zipped
    if len(head) + len(rest) > bound:
        raise DicomRejected(
            TOO_LARGE, "the deflated data set inflates to more than its header declares"
        )
    try:
        ds = pydicom.filereader.read_dataset(io.BytesIO(head + rest), False, True)
    except Exception as err:
        raise DicomRejected(
            UNREADABLE, f"header could not be parsed ({type(err).__name__})"
        ) from err
    # Inflated, the pixel data are native Explicit VR Little Endian.
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def _deflated_header(head: bytes, max_image_dim: int | None) -> tuple[int, int]:
    """(offset of Pixel Data, declared pixel bytes) of an inflated data set's first bytes."""
    fp = io.BytesIO(head)
    try:
        header = pydicom.filereader.read_dataset(
            fp, False, True, stop_when=lambda tag, vr, length: tag == 0x7FE00010
        )
    except Exception as err:
        if len(head) >= DEFLATE_HEADER_PROBE:  # cut by the probe, not corrupt
            raise DicomRejected(TOO_LARGE, "the deflated header is larger than is read") from err
        raise DicomRejected(
            UNREADABLE, f"header could not be parsed ({type(err).__name__})"
        ) from err
    offset = fp.tell()
    if head[offset : offset + 4] != _PIXEL_DATA_TAG:
        if len(head) >= DEFLATE_HEADER_PROBE:
            raise DicomRejected(TOO_LARGE, "the deflated header is larger than the server reads")
        return len(head), 0  # the whole data set, without pixel data
    return offset, check_image_size(header, max_image_dim, frames=None)


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
    rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated", 8)
    count = _number_of_frames(ds) if frames is None else frames
    size = max(rows, 0) * max(columns, 0) * max(samples, 1) * max((bits + 7) // 8, 1) * count
    if max_image_dim is None:
        return size
    budget = decoded_bytes_limit(max_image_dim) if max_decoded_bytes is None else max_decoded_bytes
    if max(rows, columns) > max_image_dim or size > budget:
        raise DicomRejected(TOO_LARGE, "the image is larger than the decoder accepts")
    return size


def _header_int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError) as err:
        # Not the parser's text: it would quote the value.
        raise DicomRejected(UNREADABLE, "an image size attribute is not a number") from err


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


def decode_dataset(
    ds: Dataset,
    multiframe: str = "middle",
    max_image_dim: int | None = MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
) -> DecodedImage:
    """Decode the pixel data of ``ds`` into display-space frames.

    Args:
        ds: a dataset from :func:`read_dataset`.
        multiframe: ``middle`` keeps the middle frame of a multi-frame image, ``all`` keeps all.
        max_image_dim: the largest rows or columns decoded (None: no limit); the frames to
            decode must also fit ``max_decoded_bytes`` (None: :func:`decoded_bytes_limit`),
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

    n_frames = _number_of_frames(ds)
    frame_indices = list(range(n_frames)) if multiframe == "all" else [n_frames // 2]
    notes = [f"frames:{n_frames}->{len(frame_indices)}"] if n_frames > 1 else []
    # Decoders allocate what the header declares, and a compressed frame's decoder what its
    # codestream declares: check both before any of them runs.
    check_image_size(ds, max_image_dim, len(frame_indices), max_decoded_bytes)
    check_codestream(ds, frame_indices, max_image_dim, max_decoded_bytes)

    pixels = _decode_pixels(ds, n_frames, frame_indices)
    frames = [
        _to_display(frame, ds, index, notes)
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
) -> DecodedImage:
    """:func:`read_dataset` then :func:`decode_dataset`, both bounded by ``max_image_dim``
    (and the decoding by ``max_decoded_bytes``)."""
    return decode_dataset(
        read_dataset(path, max_image_dim), multiframe, max_image_dim, max_decoded_bytes
    )


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
    n_frames = _number_of_frames(ds)
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
    samples = _header_int(ds, "SamplesPerPixel", 1)
    if tsyntax == pydicom.uid.RLELossless:
        bytes_per_sample = max((_header_int(ds, "BitsAllocated", 8) + 7) // 8, 1)
        if codestream.rle_segments(frame) != samples * bytes_per_sample:
            raise DicomRejected(DECODE_FAILED, "the RLE segments do not match the header")
        return
    declared = codestream.declared_size(frame)
    if declared is None:
        raise DicomRejected(DECODE_FAILED, "a compressed frame is not of its transfer syntax")
    rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
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


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError, OverflowError) as err:
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
