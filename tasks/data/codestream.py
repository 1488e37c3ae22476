"""The image size a compressed codestream declares, read from its header without decoding it.

Decoders allocate what the codestream says, not what the DICOM header (Rows, Columns) says: a
215 KB JPEG-Lossless frame whose SOF declares 65000 x 65000 grew a worker to 16 GB. So before
any decoder runs, the caller reads the declared size here and compares it with the header and
its limits (:func:`tasks.data.dicom_guards.check_codestream`, :func:`tasks.model.inference.prepare_png`).

Parsers, each over ``bytes`` in memory, reading only marker segments and box headers (never
entropy-coded data), and returning a :class:`DeclaredSize` or raising :class:`CodestreamError`:

- :func:`jpeg_size`: JPEG SOF0..SOF15 (baseline, extended, lossless SOF3, progressive,
  arithmetic) and JPEG-LS SOF55 (0xFFF7), ITU-T T.81 B.2.2 and T.87 C.2.2.
- :func:`j2k_size`: JPEG 2000 (and HTJ2K) SIZ, in a raw codestream or a JP2 file's ``jp2c``
  box (ISO/IEC 15444-1 A.5.1, I.4).
- :func:`png_size`: PNG IHDR (the first chunk).
- :func:`rle_segments`: the number of segments in a DICOM RLE frame's 64-byte header
  (PS3.5 G.5).

:func:`declared_size` picks the parser from the stream's first bytes. Nothing here imports
pydicom or a decoder; messages are fixed sentences (no bytes of the stream are quoted).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

JPEG_SOI = b"\xff\xd8"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start Of Frame markers: 0xC0..0xCF except DHT (C4), JPG (C8) and DAC (CC); JPEG-LS SOF55.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_LS_SOF = 0xF7
# Markers that stand alone (no length field): TEM, RST0..RST7, SOI.
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# PNG colour type -> samples per pixel (PNG 1.2, 11.2.2).
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# A JP2 file puts its codestream after a few small boxes; more boxes than this is not an image.
MAX_JP2_BOXES = 64


class CodestreamError(ValueError):
    """A stream whose header cannot be read: truncated, or not the format it claims."""


@dataclass(frozen=True)
class DeclaredSize:
    """What a codestream's header says it decodes to.

    Attributes:
        rows, columns: the image's height and width in pixels.
        components: samples per pixel (1 grey, 3 colour, 4 with alpha...).
        bits: bits per sample (the largest over components).
        kind: ``jpeg``, ``jpeg-ls``, ``j2k`` or ``png``.
    """

    rows: int
    columns: int
    components: int
    bits: int
    kind: str

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded samples: rows x columns x components x whole bytes per sample."""
        return self.rows * self.columns * self.components * max((self.bits + 7) // 8, 1)


def declared_size(data: bytes) -> DeclaredSize | None:
    """The size declared by a JPEG, JPEG-LS, JPEG 2000 (raw or JP2) or PNG stream, chosen by its
    first bytes; None when the stream starts like none of them.

    Raises:
        CodestreamError: the stream starts like one of them but its header does not parse.
    """
    if data.startswith(JPEG_SOI):
        return jpeg_size(data)
    if data.startswith(J2K_SOC_SIZ) or data.startswith(JP2_SIGNATURE):
        return j2k_size(data)
    if data.startswith(PNG_SIGNATURE):
        return png_size(data)
    return None


def jpeg_size(data: bytes) -> DeclaredSize:
    """The frame header of a JPEG or JPEG-LS stream: SOFn's ``Y`` (rows), ``X`` (columns),
    ``Nf`` (components) and ``P`` (bits).

    Walks the marker segments from SOI by their lengths up to the first SOF (at most one pass
    over ``data``); reaching SOS or EOI first is an error, and so is ``Y = 0`` (the height
    would come later in a DNL segment, after the decoder has started).
    """
    if not data.startswith(JPEG_SOI):
        raise CodestreamError("the stream does not start with a JPEG SOI marker")
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise CodestreamError("a JPEG marker segment is malformed")
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker (T.81 B.1.1.2)
            position += 1
            continue
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        if marker in (0xDA, 0xD9):  # SOS, EOI: no frame header before the data
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        if length < 2:
            raise CodestreamError("a JPEG marker segment is malformed")
        if marker in SOF_MARKERS or marker == JPEG_LS_SOF:
            return _jpeg_frame_header(data, position + 4, marker)
        position += 2 + length
    raise CodestreamError("the JPEG stream has no frame header (SOF) before its data")


def _jpeg_frame_header(data: bytes, start: int, marker: int) -> DeclaredSize:
    """SOFn's fields after its length: P (1 byte), Y (2), X (2), Nf (1)."""
    if start + 6 > len(data):
        raise CodestreamError("the JPEG frame header is cut off")
    bits, rows, columns, components = struct.unpack_from(">BHHB", data, start)
    if rows == 0:
        raise CodestreamError("the JPEG frame header defers its height (DNL); not supported")
    if columns == 0 or components == 0:
        raise CodestreamError("the JPEG frame header declares an empty image")
    kind = "jpeg-ls" if marker == JPEG_LS_SOF else "jpeg"
    return DeclaredSize(rows, columns, components, bits, kind)


def j2k_size(data: bytes) -> DeclaredSize:
    """The SIZ segment of a JPEG 2000 codestream, raw or inside a JP2 file's ``jp2c`` box.

    Rows are ``Ysiz - YOsiz`` and columns ``Xsiz - XOsiz`` (the image area on the reference
    grid); bits the largest ``Ssiz`` depth over ``Csiz`` components.
    """
    if data.startswith(JP2_SIGNATURE):
        data = _jp2_codestream(data)
    if not data.startswith(J2K_SOC_SIZ):
        raise CodestreamError("the stream does not start with a JPEG 2000 SOC and SIZ")
    # SOC (2 bytes), SIZ (2), Lsiz (2), Rsiz (2), then Xsiz, Ysiz, XOsiz, YOsiz (4 each) at 8,
    # four tile fields (4 each), Csiz (2) at 40 and Ssiz, XRsiz, YRsiz per component from 42.
    if len(data) < 42:
        raise CodestreamError("the JPEG 2000 SIZ segment is cut off")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, 8)
    (csiz,) = struct.unpack_from(">H", data, 40)
    depths = data[42 : 42 + 3 * csiz : 3]
    if csiz == 0 or len(depths) != csiz:
        raise CodestreamError("the JPEG 2000 SIZ segment is cut off")
    if xsiz <= xosiz or ysiz <= yosiz:
        raise CodestreamError("the JPEG 2000 SIZ segment declares an empty image")
    bits = max((depth & 0x7F) + 1 for depth in depths)
    return DeclaredSize(ysiz - yosiz, xsiz - xosiz, csiz, bits, "j2k")


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of a JP2 file's contiguous codestream box (``jp2c``), from its box headers."""
    position = 0
    for _ in range(MAX_JP2_BOXES):
        if position + 8 > len(data):
            break
        length, box = struct.unpack_from(">I4s", data, position)
        header = 8
        if length == 1:  # the length follows as 8 bytes (XLBox)
            if position + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, position + 8)
            header = 16
        elif length == 0:  # the box runs to the end of the file
            length = len(data) - position
        if box == b"jp2c":
            return data[position + header : position + length]
        if length < header:
            break
        position += length
    raise CodestreamError("the JP2 file has no codestream box")


def png_size(data: bytes) -> DeclaredSize:
    """A PNG's IHDR chunk: width, height, bit depth and colour type (samples per pixel)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 8 + 8 + 13:
        raise CodestreamError("the stream does not start with a PNG signature and IHDR")
    columns, rows, bits, colour_type = struct.unpack_from(">IIBB", data, 16)
    if colour_type not in PNG_SAMPLES or rows == 0 or columns == 0:
        raise CodestreamError("the PNG header declares an invalid image")
    return DeclaredSize(rows, columns, PNG_SAMPLES[colour_type], bits, "png")


def rle_segments(data: bytes) -> int:
    """The number of segments a DICOM RLE frame's header declares (PS3.5 G.5: at most 15, one
    per byte of each sample)."""
    if len(data) < 64:
        raise CodestreamError("the RLE header is cut off")
    (count,) = struct.unpack_from("<I", data, 0)
    return count
