"""What the service does with DICOM output: when a client asks for it, building it, sending it.

- :func:`accepts_dicom`: whether a request's ``Accept`` header asks for DICOM. DICOMweb
  (PS3.18 8.7.3.3) answers several instances as ``multipart/related; type="application/dicom"``,
  one ``application/dicom`` part each; a client may ask for that or for plain
  ``application/dicom``. Both get the multipart reply (:func:`multipart_related`), which holds
  the SR and, unless the reply abstained, the Grad-CAM capture.
- :func:`dicom_outputs`: the upload's bytes, the JSON reply, the model's image and its Grad-CAM
  map → the SR (:mod:`serving.dicom_report`) and the SC (:mod:`serving.dicom_capture`). An
  abstention gets the SR alone: a heat map of a class the service declined to give would
  read as a finding.
- :func:`pacs_target`: the PACS to C-STORE to (:mod:`serving.pacs`), from the Bento's
  arguments (``serving.pacs.*``) or ``MEDTRANSFER_PACS=AE@host:port``.

The datasets carry the source's patient and study modules: they go only to the caller and to
the configured PACS, and nothing here logs them.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from fastapi.responses import Response
from pydicom import Dataset

from serving.dicom_capture import secondary_capture
from serving.dicom_report import structured_report
from serving.pacs import PacsTarget
from tasks.data import dicom_read

DICOM_MEDIA_TYPE = "application/dicom"
# The DICOM reply's header saying what became of the PACS send: off, stored or an error code.
PACS_HEADER = "Medtransfer-Pacs"
PACS_ENVIRONMENT = "MEDTRANSFER_PACS"


def accepts_dicom(accept: str) -> bool:
    """Whether an ``Accept`` header names ``application/dicom`` or
    ``multipart/related; type="application/dicom"`` (with a q above 0)."""
    for media_range in accept.split(","):
        main, *parameters = (p.strip() for p in media_range.split(";"))
        values = {}
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            values[key.strip().lower()] = value.strip().strip('"').lower()
        if values.get("q", "1") in ("0", "0.0", "0.00", "0.000"):
            continue
        if main.lower() == DICOM_MEDIA_TYPE:
            return True
        if main.lower() == "multipart/related" and values.get("type") == DICOM_MEDIA_TYPE:
            return True
    return False


def dicom_outputs(
    data: bytes, reply: dict, image: np.ndarray, cam: np.ndarray, max_image_dim: int
) -> list[Dataset]:
    """The SR, then (unless ``reply`` abstained) the SC, of one classified upload.

    Args:
        data: the uploaded DICOM file (already read once by the classification).
        reply: the JSON reply of that classification.
        image: the model's uint8 input ``(S, S)``; cam: its Grad-CAM map ``(S, S)`` in [0, 1].
        max_image_dim: the service's limit, for the guarded reader.

    Raises:
        serving.dicom_report.DicomOutputError: the source lacks a UID the outputs reference.
    """
    source = dicom_read.read_dataset(io.BytesIO(data), max_image_dim)
    outputs: list[Dataset] = [structured_report(source, reply)]
    if not reply.get("abstained"):
        outputs.append(secondary_capture(source, image, cam))
    return outputs


def encoded(dataset: Dataset) -> bytes:
    """A dataset as a DICOM file (preamble, file meta), the bytes of one part."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """DICOM files → (body, Content-Type) of a ``multipart/related; type="application/dicom"``
    message (RFC 2387, as DICOMweb's WADO-RS and STOW-RS use it)."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for part in parts:
        body.write(f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode("ascii"))
        body.write(part)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode("ascii"))
    content_type = f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
    return body.getvalue(), content_type


def pacs_target(settings: Mapping | None, override: str | None) -> PacsTarget | None:
    """The PACS to send to, or None (off).

    ``override`` (the ``MEDTRANSFER_PACS`` environment variable, ``AE@host:port``) wins and
    turns sending on; otherwise ``settings`` (``serving.pacs`` as packaged) when ``enabled``.
    Its calling AE title and timeout come from ``settings`` either way.

    Raises:
        ValueError: an override not of the form ``AE@host:port``.
    """
    settings = dict(settings or {})
    calling = {
        "calling_ae": settings.get("calling_ae") or "MEDTRANSFER",
        "timeout_s": float(settings.get("timeout_s") or 10.0),
    }
    if override:
        called, _, address = override.rpartition("@")
        host, _, port = address.rpartition(":")
        if not (called and host and port.isdigit()):
            raise ValueError(f"{PACS_ENVIRONMENT} must be AE@host:port")
        return PacsTarget(host=host, port=int(port), called_ae=called, **calling)
    if not settings.get("enabled"):
        return None
    return PacsTarget(
        host=settings["host"],
        port=int(settings["port"]),
        called_ae=settings["called_ae"],
        **calling,
    )


def dicom_response(outputs: Sequence[Dataset], pacs: dict | None) -> Response:
    """The DICOM reply: ``outputs`` as :func:`multipart_related`, and :data:`PACS_HEADER`
    from the reply's ``pacs`` block (None: no PACS configured)."""
    body, content_type = multipart_related([encoded(d) for d in outputs])
    headers = {PACS_HEADER: "off" if pacs is None else pacs.get("error", "stored")}
    return Response(body, media_type=content_type, headers=headers)
