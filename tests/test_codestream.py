"""The size a compressed codestream declares, read from its header: known values from real
files of pydicom's corpora, the bombs rewritten from them, and malformed headers."""

from __future__ import annotations

import struct

import pydicom
import pytest
from pydicom.encaps import generate_frames

from tasks.data import codestream
from tasks.data.codestream import CodestreamError, DeclaredSize
from tests import bombs


def first_frame(name: str) -> bytes:
    ds = pydicom.dcmread(bombs.corpus_file(name))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def frame_of(data: bytes) -> bytes:
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", DeclaredSize(768, 1024, 1, 8, "jpeg")),  # SOF3
        ("JPGExtended.dcm", DeclaredSize(1024, 256, 1, 12, "jpeg")),  # SOF1, 12-bit
        ("SC_rgb_jpeg_dcmtk.dcm", DeclaredSize(100, 100, 3, 8, "jpeg")),  # SOF0, colour
        ("MR_small_jpeg_ls_lossless.dcm", DeclaredSize(64, 64, 1, 16, "jpeg-ls")),  # SOF55
        ("SC_rgb_jls_lossy_line.dcm", DeclaredSize(100, 100, 3, 8, "jpeg-ls")),
        ("MR2_J2KR.dcm", DeclaredSize(1024, 1024, 1, 12, "j2k")),
        ("US1_J2KR.dcm", DeclaredSize(480, 640, 3, 8, "j2k")),  # rows != columns
        ("RG1_J2KI.dcm", DeclaredSize(1955, 1841, 1, 15, "j2k")),
    ],
)
def test_a_real_frame_declares_the_size_its_dicom_header_gives(
    name: str, expected: DeclaredSize
) -> None:
    assert codestream.declared_size(first_frame(name)) == expected


def test_a_jp2_file_declares_the_size_of_its_codestream_box() -> None:
    raw = first_frame("US1_J2KR.dcm")
    ftyp = struct.pack(">I4s", 20, b"ftyp") + b"jp2 " + b"\x00" * 4 + b"jp2 "
    jp2h = struct.pack(">I4s", 8 + 4, b"jp2h") + b"\x00" * 4  # contents not read
    # The codestream box with an 8-byte extended length (LBox = 1).
    jp2c = struct.pack(">I4sQ", 1, b"jp2c", 16 + len(raw)) + raw
    jp2 = codestream.JP2_SIGNATURE + ftyp + jp2h + jp2c
    assert codestream.declared_size(jp2) == DeclaredSize(480, 640, 3, 8, "j2k")
    with pytest.raises(CodestreamError, match="no codestream box"):
        codestream.j2k_size(codestream.JP2_SIGNATURE + ftyp + jp2h)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (bombs.jpeg_lossless_bomb, DeclaredSize(65000, 65000, 1, 8, "jpeg")),
        (bombs.jpeg_ls_bomb, DeclaredSize(65000, 65000, 1, 16, "jpeg-ls")),
        (bombs.j2k_bomb, DeclaredSize(40000, 40000, 1, 12, "j2k")),
    ],
)
def test_a_rewritten_bomb_declares_the_huge_size_behind_a_small_header(build, expected) -> None:
    data = build()
    assert codestream.declared_size(frame_of(data)) == expected
    assert len(data) < 600_000  # the sizes: 215 KB, 6 KB, 589 KB


def test_a_png_header_gives_its_size_and_decoded_bytes() -> None:
    declared = codestream.declared_size(bombs.png_ihdr_bomb(8192, 16, 6))
    assert declared == DeclaredSize(8192, 8192, 4, 16, "png")
    assert declared.decoded_bytes == 8192 * 8192 * 8 == 512 * 2**20
    grey = codestream.png_size(bombs.png_header(300, 8, 0) + b"\x00" * 12)
    assert (grey.rows, grey.columns, grey.components, grey.decoded_bytes) == (300, 300, 1, 90000)


@pytest.mark.parametrize(("name", "segments"), [("MR_small_RLE.dcm", 2), ("SC_rgb_rle.dcm", 3)])
def test_an_rle_frame_declares_one_segment_per_byte_of_each_sample(name, segments) -> None:
    assert codestream.rle_segments(first_frame(name)) == segments


def test_a_stream_of_no_known_format_declares_nothing() -> None:
    assert codestream.declared_size(b"\x00" * 64) is None
    assert codestream.declared_size(b"") is None


def _jpeg_with(height: int) -> bytes:
    frame = first_frame("SC_rgb_jpeg_dcmtk.dcm")
    out = bytearray(frame)
    sof = bombs._jpeg_sof_offset(frame)
    struct.pack_into(">H", out, sof + 5, height)
    return bytes(out)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (first_frame("SC_rgb_jpeg_dcmtk.dcm")[:20], "no frame header"),  # cut before SOF
        (b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 8, "no frame header"),  # SOS first
        (b"\xff\xd8\x00\x00\x00\x00", "malformed"),
        (_jpeg_with(0), "DNL"),
        (codestream.J2K_SOC_SIZ + b"\x00" * 20, "cut off"),
        (codestream.PNG_SIGNATURE + b"\x00" * 30, "PNG signature and IHDR"),
    ],
)
def test_a_malformed_header_is_refused_with_a_fixed_sentence(stream: bytes, message: str) -> None:
    with pytest.raises(CodestreamError, match=message):
        codestream.declared_size(stream)
