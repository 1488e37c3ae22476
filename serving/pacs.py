"""Sending the DICOM output to a PACS: DIMSE C-STORE with pynetdicom (``serving.pacs.*``).

C-STORE, not DICOMweb STOW-RS: every PACS speaks DIMSE (Debian's Orthanc does out of the box;
its DICOMweb is a separate plug-in), and it needs no HTTP stack of its own here.

:func:`store` (:func:`send` from the service) opens one association per request, sends each dataset, and raises
:class:`PacsError` with a reason code and a fixed message when the PACS is unreachable,
refuses the association or a dataset, or does not answer in time. Neither the message nor
anything logged names a dataset's values; pynetdicom's own log lines (AE titles, UIDs, its
dataset dumps at debug level) are silenced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset

logger = logging.getLogger("medtransfer.serving")
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)

# Reason codes of a failed send, with the message a client sees.
PACS_ERRORS: dict[str, str] = {
    "pacs_unreachable": "The PACS could not be reached or did not answer in time; the "
    "classification is in this reply, the DICOM output was not stored.",
    "pacs_refused": "The PACS refused the association (check serving.pacs.called_ae and "
    "calling_ae against its configuration); the DICOM output was not stored.",
    "pacs_store_failed": "The PACS refused to store the DICOM output (C-STORE failed); the "
    "classification is in this reply.",
    "dicom_output_unavailable": "The DICOM file lacks a UID (study, series, SOP instance or "
    "class) the DICOM output must reference; nothing was sent to the PACS.",
}


class PacsError(Exception):
    """A send that failed: ``reason`` is a key of :data:`PACS_ERRORS`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.message = PACS_ERRORS[reason]
        super().__init__(reason)

    def to_dict(self) -> dict:
        """The reply's ``pacs`` block: ``{"stored": false, "error": ..., "message": ...}``."""
        return {"stored": False, "error": self.reason, "message": self.message}


@dataclass(frozen=True)
class PacsTarget:
    """Where to send: the PACS's address and AE titles, and the seconds to wait for each of
    connecting, association and each C-STORE's answer."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "MEDTRANSFER"
    timeout_s: float = 10.0


def store(datasets: Sequence[Dataset], target: PacsTarget) -> dict:
    """C-STORE every dataset to ``target`` in one association.

    Returns ``{"stored": true, "sop_instance_uids": [...]}``; raises :class:`PacsError`.
    """
    from pynetdicom import AE

    ae = AE(ae_title=target.calling_ae)
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = target.timeout_s
    ae.connection_timeout = target.timeout_s
    try:
        assoc = ae.associate(target.host, target.port, ae_title=target.called_ae)
    except Exception:  # a name that does not resolve, a socket error
        raise PacsError("pacs_unreachable") from None
    if assoc.is_rejected:
        raise PacsError("pacs_refused")
    if not assoc.is_established:  # aborted or no answer
        raise PacsError("pacs_unreachable")
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            if not status or "Status" not in status:
                raise PacsError("pacs_unreachable")
            if status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, warnings
                raise PacsError("pacs_store_failed")
    finally:
        assoc.release()
    return {"stored": True, "sop_instance_uids": [str(d.SOPInstanceUID) for d in datasets]}


async def send(datasets: Sequence[Dataset], target: PacsTarget, route: str) -> dict:
    """:func:`store` off the event loop: the reply's ``pacs`` block, success or failure. A
    failure is logged with the route and its reason code only (no value from a dataset, no AE
    title or address)."""
    import anyio

    try:
        return await anyio.to_thread.run_sync(store, datasets, target)
    except PacsError as err:
        logger.warning("PACS store for %s failed: %s", route, err.reason)
        return err.to_dict()
