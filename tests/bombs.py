"""Decompression bombs built from real small encoded images by rewriting their declared size.

Each DICOM bomb is a real compressed file from pydicom's test corpora whose codestream header
(JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) is rewritten to declare a huge image, the bytes after
it left as they were, and the DICOM header (Rows, Columns) left at the real size: the cases of
issue 21 that the header bound did not see. Used by the tests and ``benchmarks/bombs.py``.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from tasks.data import codestream

# (corpus file, DICOM Rows x Columns) each bomb starts from.
JPEG_LOSSLESS_SOURCE = "JPGLosslessP14SV1_1s_1f_8b.dcm"  # SOF3, 768 x 1024, 215 KB
JPEG_LS_SOURCE = "MR_small_jpeg_ls_lossless.dcm"  # SOF55, 64 x 64, 6 KB
J2K_SOURCE = "MR2_J2KR.dcm"  # SIZ, 1024 x 1024, 589 KB


def corpus_file(name: str) -> Path:
    """A file of pydicom's test data or of the pydicom-data package."""
    return Path(get_testdata_file(name))


def _with_frame(name: str, rewrite) -> bytes:
    """The corpus file ``name`` with its one frame's bytes replaced by ``rewrite(frame)``."""
    ds = pydicom.dcmread(corpus_file(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([rewrite(frame)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _jpeg_sof_offset(frame: bytes) -> int:
    """Offset of the first SOFn or SOF55 marker of a JPEG stream (walked by segment lengths)."""
    position = 2
    while frame[position + 1] not in codestream.SOF_MARKERS | {codestream.JPEG_LS_SOF}:
        (length,) = struct.unpack_from(">H", frame, position + 2)
        position += 2 + length
    return position


def jpeg_bomb(name: str, rows: int, columns: int) -> bytes:
    """The JPEG or JPEG-LS corpus file ``name`` whose SOF declares ``rows`` x ``columns``."""

    def rewrite(frame: bytes) -> bytes:
        sof = _jpeg_sof_offset(frame)
        out = bytearray(frame)
        struct.pack_into(">HH", out, sof + 5, rows, columns)  # Y, X after length and P
        return bytes(out)

    return _with_frame(name, rewrite)


def jpeg_lossless_bomb(side: int = 65000) -> bytes:
    """JPEG-Lossless (SOF3) 215 KB, header 768 x 1024, codestream ``side`` x ``side``."""
    return jpeg_bomb(JPEG_LOSSLESS_SOURCE, side, side)


def jpeg_ls_bomb(side: int = 65000) -> bytes:
    """JPEG-LS (SOF55) 6 KB, header 64 x 64, codestream ``side`` x ``side``."""
    return jpeg_bomb(JPEG_LS_SOURCE, side, side)


def j2k_bomb(side: int = 40000) -> bytes:
    """JPEG 2000 589 KB, header 1024 x 1024, SIZ ``side`` x ``side`` (no offsets, one tile
    grown to the image so that the tiling stays valid)."""

    def rewrite(frame: bytes) -> bytes:
        out = bytearray(frame)
        # Xsiz, Ysiz at 8 and 12; XTsiz, YTsiz at 24 and 28 (ISO/IEC 15444-1 A.5.1).
        struct.pack_into(">II", out, 8, side, side)
        struct.pack_into(">II", out, 24, side, side)
        return bytes(out)

    return _with_frame(J2K_SOURCE, rewrite)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header(side: int, bits: int, colour_type: int) -> bytes:
    """The PNG signature and an IHDR declaring ``side`` x ``side`` (CRC correct)."""
    return codestream.PNG_SIGNATURE + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", side, side, bits, colour_type, 0, 0, 0)
    )


def png_of_zeros(side: int, bits: int = 16, colour_type: int = 6) -> bytes:
    """A valid PNG of ``side`` x ``side`` black pixels (default RGBA 16-bit), compressed row by
    row so that building it never holds the raw image: 8192 x 8192 RGBA16 is about 520 KB."""
    samples = codestream.PNG_SAMPLES[colour_type]
    row = b"\x00" + bytes(side * samples * bits // 8)  # filter type 0, then the samples
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return (
        png_header(side, bits, colour_type)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def png_ihdr_bomb(side: int = 8192, bits: int = 16, colour_type: int = 6) -> bytes:
    """A real 16 x 16 PNG whose IHDR is rewritten to ``side`` x ``side`` (default RGBA 16-bit);
    its pixel data stays that of 16 x 16."""
    small = png_of_zeros(16, bits, colour_type)
    return png_header(side, bits, colour_type) + small[len(png_header(16, bits, colour_type)) :]


def large_dicom(side: int = 8000) -> bytes:
    """A legal uncompressed ``side`` x ``side`` 8-bit grey DICOM (64 MB at 8000): within the
    upload and size limits, the largest ordinary image the service takes."""
    from tests.conftest import make_mono_dataset

    pixels = np.zeros((side, side), dtype=np.uint8)
    pixels[::7, ::5] = 200
    ds = make_mono_dataset(pixels, bits_stored=8)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def largest_dicom(side: int = 8192, syntax: str = "rle") -> bytes:
    """A legal ``side`` x ``side`` 16-bit grey DICOM compressed with RLE Lossless (``rle``) or
    JPEG 2000 Lossless (``j2k``): at 8192 it is the largest image the service admits (8192 =
    serving.max_image_dim, 128 MiB decoded = serving.max_decoded_mib), in a few MB of upload
    (uncompressed it would be over serving.max_upload_bytes)."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from tests.conftest import make_mono_dataset

    pixels = np.zeros((side, side), dtype=np.uint16)
    inner = slice(side // 8, side - side // 8)
    ramp = (np.arange(side, dtype=np.uint32) * 7 % 60000).astype(np.uint16)
    pixels[inner, inner] = ramp[inner, None]  # each row one value: small once compressed
    pixels[:, :: max(side // 16, 1)] = 65000  # and a few bright columns
    ds = make_mono_dataset(pixels, bits_stored=16)
    ds.compress({"rle": RLELossless, "j2k": JPEG2000Lossless}[syntax], encoding_plugin="pylibjpeg")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
