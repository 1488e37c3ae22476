"""Why a DICOM file cannot become an image: the reason codes and :class:`DicomRejected`.

Every way a file can fail to decode (:mod:`tasks.data.dicom_io`) is a :class:`DicomRejected` with
a short ``reason`` code, so that the ingestion stage can put the file in its quarantine report
instead of crashing and the service can answer with a status. A rejection's ``detail`` is a
sentence written by the decoder, never a decoder's text or an attribute's value.
"""

from __future__ import annotations

# Quarantine reason codes (the `reason` column of quarantine.csv).
NOT_DICOM = "not_dicom"

UNREADABLE = "unreadable"

NO_PIXEL_DATA = "no_pixel_data"

UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"

UNSUPPORTED_IMAGE = "unsupported_image"

DECODE_FAILED = "decode_failed"

TOO_LARGE = "too_large"


class DicomRejected(Exception):
    """A file that cannot become an image; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
