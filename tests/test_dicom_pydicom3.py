"""pydicom 3 behaviours of the DICOM decoder: the dataset encoding, VOI LUT Functions,
Presentation LUT Shape, and decoding one frame of a multi-frame file.

Every expected value is computed here from the formulas of the DICOM standard
(PS3.3 C.11.2.1.2 and C.11.2.1.3 for the windows, C.11.6.1.2 for the Presentation LUT Shape).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.data import dicom_io
from tests.conftest import make_mono_dataset


@pytest.fixture
def pydicom_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's own preview of version 4: its deprecated attributes raise AttributeError."""
    monkeypatch.setattr(pydicom.config, "_use_future", True)


def _headerless_bytes(implicit_vr: bool, little_endian: bool) -> bytes:
    """A dataset written without preamble or File Meta (old ACR-NEMA style), as bytes."""
    ds = make_mono_dataset(np.arange(6, dtype=np.uint16).reshape(2, 3) * 100)
    del ds.file_meta
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=implicit_vr, little_endian=little_endian)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "expected"),
    [
        (True, True, ImplicitVRLittleEndian),
        (False, True, ExplicitVRLittleEndian),
        (False, False, ExplicitVRBigEndian),
    ],
)
@pytest.mark.usefixtures("pydicom_future")
def test_a_headerless_file_gets_the_transfer_syntax_it_was_read_with_without_deprecated_attributes(
    implicit_vr: bool, little_endian: bool, expected: str
) -> None:
    ds = dicom_io.read_dataset(BytesIO(_headerless_bytes(implicit_vr, little_endian)))
    assert ds.file_meta.TransferSyntaxUID == expected
