"""Uploads for the serving tests: real DICOM files (pydicom's test corpus) and bad inputs.

Each bad input is paired with the status and reason code the service documents for it
(:data:`tasks.model.inference.REJECTIONS`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from tests.conftest import make_mono_dataset

# Single-frame images in several transfer syntaxes and photometric interpretations:
# explicit/implicit little endian, big endian, RLE, JPEG baseline/extended/lossless, JPEG-LS,
# JPEG 2000 (lossless and lossy), RGB and YBR colour.
GOOD_DICOM = (
    "CT_small.dcm",
    "MR_small.dcm",
    "ExplVR_BigEnd.dcm",
    "MR_small_RLE.dcm",
    "JPEG-LL.dcm",
    "JPGExtended.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "MR2_J2KI.dcm",
    "US1_J2KR.dcm",
    "SC_rgb.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
)
SECRET_NAME = "Doe^Secretname"
SECRET_ID = "SECRET-PID-QXZW"


def corpus_bytes(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def dataset_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def identified_dicom(frames: int = 1, rows: int = 48, columns: int = 40) -> bytes:
    """A MONOCHROME1 image carrying a patient name and ID, and an invalid birth date (pydicom
    warns about such values by quoting them)."""
    rng = np.random.default_rng(frames + rows)
    shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    pixels = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    ds = make_mono_dataset(
        pixels,
        photometric="MONOCHROME1",
        patient_id=SECRET_ID,
        PatientName=SECRET_NAME,
        PatientBirthDate="19991399",
        InstitutionName="Secretname Hospital",
    )
    return dataset_bytes(ds)


def unsupported_syntax_dicom() -> bytes:
    """CT_small.dcm declared as MPEG-2 video: a transfer syntax no decoder here handles."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([ds.PixelData])  # compressed syntaxes need fragments
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class BadInput:
    """One bad upload to ``route`` and the answer the service documents for it."""

    name: str
    route: str
    body: bytes
    content_type: str | None
    status: int
    reason: str


def bad_inputs(max_upload_bytes: int, max_image_dim: int) -> list[BadInput]:
    """Every documented kind of bad single-image upload."""
    ct = corpus_bytes("CT_small.dcm")
    tall = make_mono_dataset(np.zeros((max_image_dim + 1, 4), dtype=np.uint16))
    dicom = "application/dicom"
    return [
        BadInput(
            "not DICOM", "/classify/dicom", b"hello, not a DICOM file" * 9, dicom, 422, "not_dicom"
        ),
        BadInput(
            "truncated before the pixels", "/classify/dicom", ct[:300], dicom, 422, "no_pixel_data"
        ),
        BadInput(
            "truncated pixel data",
            "/classify/dicom",
            corpus_bytes("MR_truncated.dcm"),
            dicom,
            422,
            "decode_failed",
        ),
        BadInput(
            "no pixel data",
            "/classify/dicom",
            corpus_bytes("rtplan.dcm"),
            dicom,
            422,
            "no_pixel_data",
        ),
        BadInput(
            "unsupported transfer syntax",
            "/classify/dicom",
            unsupported_syntax_dicom(),
            dicom,
            422,
            "unsupported_transfer_syntax",
        ),
        BadInput(
            "multi-frame",
            "/classify/dicom",
            corpus_bytes("emri_small.dcm"),
            dicom,
            422,
            "multi_frame",
        ),
        BadInput(
            "too many rows", "/classify/dicom", dataset_bytes(tall), dicom, 422, "image_too_large"
        ),
        BadInput("empty body", "/classify/dicom", b"", dicom, 400, "empty_body"),
        BadInput(
            "text content type", "/classify/dicom", ct, "text/plain", 415, "unsupported_media_type"
        ),
        BadInput(
            "JSON content type",
            "/classify/dicom",
            ct,
            "application/json",
            415,
            "unsupported_media_type",
        ),
        BadInput("no content type", "/classify/dicom", ct, None, 415, "unsupported_media_type"),
        BadInput(
            "oversized file",
            "/classify/dicom",
            ct + b"\0" * max_upload_bytes,
            dicom,
            413,
            "payload_too_large",
        ),
        BadInput("DICOM sent as PNG", "/classify/png", ct, "image/png", 422, "not_png"),
        BadInput(
            "PNG endpoint, DICOM type", "/classify/png", ct, dicom, 415, "unsupported_media_type"
        ),
        BadInput("empty PNG", "/classify/png", b"", "image/png", 400, "empty_body"),
    ]


def deflated_dicom(ds, pixel_bytes: int | None = None) -> bytes:
    """``ds`` written as Deflated Explicit VR Little Endian (PS3.5 A.5).

    With ``pixel_bytes``, the Pixel Data element is replaced by that many zero bytes, whatever
    the header says: a deflate bomb (1 GiB of zeros deflates to about 1 MB).
    """
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    if pixel_bytes is None:
        write_dataset(body, ds)
        deflated = compressor.compress(body.getvalue())
    else:
        del ds.PixelData
        write_dataset(body, ds)
        # (7FE0,0010) OB, two reserved bytes, a 4-byte length: then the zeros.
        header = body.getvalue() + b"\xe0\x7f\x10\x00OB\0\0" + pixel_bytes.to_bytes(4, "little")
        parts = [compressor.compress(header)]
        zeros = b"\0" * (16 * 1024 * 1024)
        for start in range(0, pixel_bytes, len(zeros)):
            parts.append(compressor.compress(zeros[: pixel_bytes - start]))
        deflated = b"".join(parts)
    deflated += compressor.flush()
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out.getvalue() + deflated


def deflate_bomb(inflated_bytes: int = 2**30) -> bytes:
    """A 64 x 64 image whose deflated data set inflates to ``inflated_bytes`` (1 GiB: ~1 MB)."""
    ds = make_mono_dataset(np.zeros((64, 64), dtype=np.uint16))
    return deflated_dicom(ds, pixel_bytes=inflated_bytes)
