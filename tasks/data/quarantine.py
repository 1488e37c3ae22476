"""Why an input file is left out of the dataset: every reason code ``quarantine.csv`` can hold.

The decoder's own codes (:mod:`tasks.data.dicom_rejections`) and the two ingestion adds when it
resolves a decoded file's label: no label in the labels source, or a SOP Instance UID an earlier
file already had. The ingest report counts the quarantined files under each of these.
"""

from __future__ import annotations

from tasks.data import dicom_rejections

NO_LABEL = "no_label"

DUPLICATE_SOP_UID = "duplicate_sop_instance_uid"

QUARANTINE_REASONS = (
    dicom_rejections.NOT_DICOM,
    dicom_rejections.UNREADABLE,
    dicom_rejections.NO_PIXEL_DATA,
    dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX,
    dicom_rejections.UNSUPPORTED_IMAGE,
    dicom_rejections.DECODE_FAILED,
    dicom_rejections.TOO_LARGE,
    NO_LABEL,
    DUPLICATE_SOP_UID,
)
