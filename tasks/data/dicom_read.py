"""Reading a DICOM file's header and pixel bytes (not yet decoded), and the patient identity.

:func:`read_dataset` reads a file or an in-memory upload, tolerating old files without a DICOM
preamble, and inflates a Deflated Explicit VR Little Endian data set with a bounded decompressor
instead of pydicom's unbounded ``zlib.decompress``: a 1 MB deflate bomb is refused
(``too_large``) after inflating at most its header's worth of pixel data. :func:`patient_key` is
the identity that keeps one patient in one split (only ever stored as a salted hash).

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
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError

from tasks.data.dicom_guards import MAX_IMAGE_DIM, check_image_size
from tasks.data.dicom_rejections import NOT_DICOM, TOO_LARGE, UNREADABLE, DicomRejected

# After pydicom's import, which configures its logger: nothing pydicom says may reach a log,
# since its messages quote attribute values (UIDs, names, malformed values).
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# A deflated data set's header (everything before Pixel Data) must inflate within this much.
DEFLATE_HEADER_PROBE = 4 * 1024 * 1024

# Room for elements after the pixel data (overlays, padding) in a deflated data set.
DEFLATE_SLACK = 1024 * 1024


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
