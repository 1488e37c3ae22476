"""Classifying uploaded images: the serving path, shared by the BentoML service and the tests.

An uploaded DICOM file takes exactly the ingestion path:
:func:`tasks.data.dicom_read.read_dataset` → :func:`tasks.data.dicom_io.decode_dataset` →
:func:`tasks.data.preprocess.resize_display` (uint8) →
:func:`tasks.model.transforms.to_tensor_transform` (float32 in [0, 1]) → the student → softmax
(:func:`tasks.model.predict.probabilities`). A PNG becomes display space through
:func:`tasks.data.image_files.to_display` (as an image folder's files do at ingestion) and then
follows the same path. The Bento imports this module; nothing here is copied into ``serving/``.

Every way an upload can be unusable is an :class:`InputRejected` with an HTTP status, a short
reason code and a fixed message. Messages never quote a DICOM attribute value, a file name or
a decoder's own text, so no patient-identifying value can reach a reply or a log line.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tasks.data import codestream, dicom_guards, dicom_io, dicom_read, dicom_rejections
from tasks.data.image_files import to_display
from tasks.data.preprocess import luma, resize_colour, resize_display
from tasks.model.label_kind import SINGLE_LABEL, image_uniforms
from tasks.model.profile import header_values

# Reason codes of rejected uploads, with the status and the message a client sees.
REJECTIONS: dict[str, tuple[int, str]] = {
    "empty_body": (400, "The request body is empty; send the image bytes."),
    "bad_request": (400, "The request is malformed or was cut off."),
    "bad_multipart": (400, "The multipart/form-data body could not be parsed."),
    "no_files": (400, "The batch holds no file; send one or more parts named 'files'."),
    "payload_too_large": (413, "The request body is larger than the server accepts."),
    "too_many_files": (413, "The batch holds more files than the server accepts."),
    "unsupported_media_type": (415, "Wrong Content-Type for this endpoint."),
    dicom_rejections.NOT_DICOM: (422, "The upload is not a DICOM file."),
    dicom_rejections.UNREADABLE: (422, "The DICOM header is truncated or corrupt."),
    dicom_rejections.NO_PIXEL_DATA: (
        422,
        "The DICOM file has no pixel data (it is not an image, or it was cut off before its pixels).",
    ),
    dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX: (
        422,
        "The DICOM file's transfer syntax (compression) is not supported.",
    ),
    dicom_rejections.UNSUPPORTED_IMAGE: (
        422,
        "The image type (photometric interpretation) is not supported.",
    ),
    dicom_rejections.DECODE_FAILED: (422, "The pixel data does not decode (truncated or corrupt)."),
    "multi_frame": (
        422,
        "The DICOM file is a multi-frame volume; this endpoint classifies one image. "
        "Send single frames.",
    ),
    "image_too_large": (422, "The image's rows or columns exceed the server's limit."),
    dicom_rejections.TOO_LARGE: (
        413,
        "The image decodes to more than its header declares or than the server accepts.",
    ),
    "not_png": (422, "The upload is not a PNG image."),
    "out_of_scope": (
        422,
        "The image's DICOM metadata is outside the data the model was trained on.",
    ),
    "dicom_output_needs_dicom": (
        406,
        "DICOM output (Accept: application/dicom) needs a DICOM input: send the DICOM file to "
        "/classify/dicom, or accept application/json here.",
    ),
    "dicom_output_per_file": (
        406,
        "DICOM output is made per file: send each DICOM file to /classify/dicom with Accept: "
        "application/dicom.",
    ),
    "dicom_output_unavailable": (
        422,
        "The DICOM file lacks a UID (study, series, SOP instance or class) that its DICOM "
        "output must reference; ask for application/json.",
    ),
    "channel_mismatch": (
        422,
        "The model classifies colour images (3 channels) and this image is gray; send the "
        "colour image (a gray one is never made colour by guessing).",
    ),
}

# Channels of uploads (the documented rule, README "Serving"): a gray model (1 channel) takes a
# colour upload as ITU-R BT.601 luma, as ingestion with data.channels gray does; a colour model
# (3 channels) takes colour uploads as they are and refuses a gray one (422 channel_mismatch).


class InputRejected(Exception):
    """An upload that cannot be classified.

    Attributes:
        reason: a code from :data:`REJECTIONS`.
        status: the HTTP status to answer with (4xx).
        message: a fixed sentence safe to show and to log (no values from the upload).
    """

    def __init__(self, reason: str, where: str = "", hint: str = "") -> None:
        status, message = REJECTIONS[reason]
        self.reason = reason
        self.status = status
        self.hint = hint
        self.message = f"{where}{message}{hint}"
        super().__init__(f"{reason}: {self.message}")

    def to_dict(self) -> dict[str, str | int]:
        """The JSON error body: ``{"error": reason, "message": ..., "status": ...}``."""
        return {"error": self.reason, "message": self.message, "status": self.status}


def prepare_dicom(
    source: bytes | str | Path | BinaryIO,
    image_size: int,
    max_image_dim: int = dicom_guards.MAX_IMAGE_DIM,
    multiframe: str | None = None,
    scope=None,
    max_decoded_bytes: int | None = None,
    channels: int = 1,
) -> np.ndarray:
    """One DICOM image → the uint8 ``(image_size, image_size)`` image a gray model sees, or
    ``(3, image_size, image_size)`` for a colour one (``channels`` 3).

    Args:
        source: the file's bytes, a path, or a seekable binary stream.
        image_size: the student's input side (``StudentSpec.image_size``).
        max_image_dim: refuse images with more rows or columns than this (checked on the header,
            before any pixel is decoded); decoding and inflating are bounded by it too.
        multiframe: the rule the model's training data was ingested with (``data.multiframe``):
            ``middle`` takes a multi-frame file's middle frame, as ingestion did; ``all`` or
            None refuses multi-frame files (one image per request).
        scope: a :class:`tasks.model.profile.Scope`: a file whose header values are outside
            it is refused ``out_of_scope`` (the message names what was expected); None: no check.
        max_decoded_bytes: the most bytes the decoded image may hold (as its header and its
            codestream declare; None: :func:`tasks.data.dicom_guards.decoded_bytes_limit`).
        channels: the model's input channels: 1 makes a colour image luma, 3 keeps colour
            and refuses a gray image (``channel_mismatch``).

    Raises:
        InputRejected: not DICOM, truncated, no pixel data, unsupported transfer syntax or image
            type, multi-frame (unless ``middle``), too large, pixel data that does not decode,
            or a gray image for a colour model.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise InputRejected("empty_body")
        source = io.BytesIO(bytes(source))
    try:
        ds = dicom_read.read_dataset(source, max_image_dim)
        if not any(keyword in ds for keyword in dicom_io.PIXEL_KEYWORDS):
            raise InputRejected(dicom_rejections.NO_PIXEL_DATA)  # not an image: before its scope
        _check_scope(ds, scope)
        if _header_int(ds, "NumberOfFrames", 1) > 1 and multiframe != "middle":
            raise InputRejected("multi_frame")
        rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
        if max(rows, columns) > max_image_dim:
            raise InputRejected("image_too_large")
        decoded = dicom_io.decode_dataset(
            ds, "middle", max_image_dim, max_decoded_bytes, colour=channels == 3
        )
    except dicom_rejections.DicomRejected as err:
        raise InputRejected(err.reason) from None  # err.detail may quote the file: not shown
    except InputRejected:
        raise
    except Exception:  # a decoder failing on hostile bytes is still the upload's fault
        raise InputRejected(dicom_rejections.DECODE_FAILED) from None
    if decoded.frames.shape[0] != 1:  # e.g. a 3-D array without NumberOfFrames
        raise InputRejected("multi_frame")
    return _for_model(decoded.frames[0], image_size, channels)


def _for_model(display: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """A display-space frame (``(H, W)`` or ``(H, W, 3)``) → the model's uint8 image, by the
    channel rule above."""
    if channels == 3:
        if display.ndim != 3:
            raise InputRejected("channel_mismatch")
        return resize_colour(display, image_size)
    return resize_display(luma(display) if display.ndim == 3 else display, image_size)


def prepare_png(
    data: bytes,
    image_size: int,
    max_image_dim: int | None = dicom_guards.MAX_IMAGE_DIM,
    max_decoded_bytes: int | None = None,
    channels: int = 1,
) -> np.ndarray:
    """A PNG (8-bit or 16-bit grey, palette, RGB, with or without alpha) → uint8 model image
    (``(S, S)``, or ``(3, S, S)`` for a colour model, ``channels`` 3).

    Pixels become display space by :func:`tasks.data.image_files.to_display` (8-bit / 255,
    16-bit grey / 65535), as an image folder's PNG files do at ingestion. Colour ones become
    luma for a gray model, as ingestion with ``data.channels`` gray does; a gray one is refused by a colour model (``channel_mismatch``).
    Before Pillow sees it, the IHDR's size is checked against ``max_image_dim`` (422
    ``image_too_large``) and its decoded bytes (width x height x samples x bytes per sample)
    against ``max_decoded_bytes`` (None: :func:`tasks.data.dicom_guards.decoded_bytes_limit`;
    413 ``too_large``).

    Raises:
        InputRejected: empty, not a PNG, too large, or pixel data that does not decode.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise InputRejected("empty_body")
    check_png_header(data, max_image_dim, max_decoded_bytes)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError:
        raise InputRejected("image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputRejected("not_png") from None
    # The header gives the size before any pixel is decompressed: refuse decompression bombs.
    if max_image_dim is not None and max(image.size) > max_image_dim:
        raise InputRejected("image_too_large")
    try:
        image.load()
        display = to_display(image)  # as ingestion converts an image folder's PNG
    except dicom_rejections.DicomRejected as err:
        raise InputRejected(err.reason) from None
    except Exception:
        raise InputRejected(dicom_rejections.DECODE_FAILED) from None
    return _for_model(display, image_size, channels)


def check_png_header(
    data: bytes, max_image_dim: int | None, max_decoded_bytes: int | None = None
) -> None:
    """Refuse a PNG whose IHDR declares more than the limits, before any decoder runs.

    Pillow's own bomb check counts pixels only (a 16-bit RGBA pixel is 8 bytes), and it
    decompresses every row of what the IHDR declares: an 8192 x 8192 RGBA 16-bit PNG of 522 KB
    cost 3.2 GB.
    """
    try:
        declared = codestream.png_size(data)
    except codestream.CodestreamError:
        raise InputRejected("not_png") from None
    if max_image_dim is None:
        return
    if max(declared.rows, declared.columns) > max_image_dim:
        raise InputRejected("image_too_large")
    budget = dicom_guards.decoded_bytes_limit(max_image_dim)
    if declared.decoded_bytes > (budget if max_decoded_bytes is None else max_decoded_bytes):
        raise InputRejected(dicom_rejections.TOO_LARGE)


def _check_scope(ds, scope) -> None:
    if scope is None:
        return
    expected = scope.violation(header_values(ds))
    if expected is not None:
        raise InputRejected("out_of_scope", hint=expected)


def _header_int(ds, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise InputRejected(dicom_rejections.UNREADABLE) from None


@dataclass(frozen=True)
class Decision:
    """The classification of one image."""

    probabilities: dict[str, float]
    label: str


def decide(probs: np.ndarray, classes: Sequence[str], threshold: float | None) -> Decision:
    """One image's probabilities ``(C,)`` → class probabilities and the predicted label.

    Two classes: the second (positive) class when its probability reaches ``threshold``
    (the one chosen on validation by the evaluation stage), else the first. More classes, or
    no threshold: the most probable class (the label kind's rule,
    :meth:`tasks.model.label_kind.SingleLabel.decide`).
    """
    probs = np.asarray(probs, dtype=np.float64)
    index = int(SINGLE_LABEL.decide(probs[None], threshold)[0])
    return Decision(
        probabilities={name: float(p) for name, p in zip(classes, probs, strict=True)},
        label=str(classes[index]),
    )


def prediction_set(
    probs: np.ndarray,
    classes: Sequence[str],
    coverage: float | None,
    threshold: float | None,
    image: np.ndarray,
) -> dict | None:
    """One image's conformal prediction set from its probabilities ``(C,)``:
    ``{"coverage": 0.95, "labels": [...]}`` (labels in class order), the classes whose
    conformal score is within ``threshold``, the quantile calibrated at packaging
    (:mod:`tasks.evaluation.conformal`); None for a model packaged without one. ``image``
    is the model-ready uint8 image: its SHA-256 gives the score's draw, as the dataset's
    ``image_sha256`` does at calibration."""
    if threshold is None or coverage is None:
        return None
    u = image_uniforms([hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()])
    probs = np.asarray(probs, dtype=np.float64)[None]
    row = SINGLE_LABEL.prediction_sets(probs, threshold, u)[0]
    return {
        "coverage": float(coverage),
        "labels": [str(name) for name, inside in zip(classes, row, strict=True) if inside],
    }


class Predictor:
    """A saved student plus the serving preprocessing: what the Bento runs, in process.

    ``Predictor.from_folder(path).predict_dicom(bytes)`` gives the same probabilities as the
    service (the service's model worker is built with :meth:`from_folder` too).
    """

    def __init__(self, model, spec) -> None:
        self.model = model
        self.spec = spec

    @classmethod
    def from_folder(cls, folder: str | Path) -> Predictor:
        """Load ``folder/model.pt`` with :func:`tasks.model.student_io.load_student`."""
        from tasks.model.student_io import load_student

        model, spec = load_student(folder)
        return cls(model, spec)

    def predict_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``(B, S, S)`` images (``(B, 3, S, S)`` for a colour student) at the student's
        size → calibrated probabilities ``(B, C)`` (the temperature saved with the student)."""
        images = np.asarray(images)
        channels = getattr(self.spec, "channels", 1)
        side = (self.spec.image_size,) * 2
        expected = side if channels == 1 else (channels, *side)
        if images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images (B, {', '.join(map(str, expected))}), "
                f"got shape {images.shape}"
            )
        # deferred: tasks.model.predict imports torch, which the service's API process (it
        # imports this module to decode uploads) never needs
        from tasks.model.predict import probabilities

        return probabilities(self.model, images, getattr(self.spec, "temperature", 1.0))

    def predict_dicom(self, source: bytes | str | Path) -> np.ndarray:
        """One DICOM file → probabilities ``(C,)``; raises :class:`InputRejected`."""
        image = prepare_dicom(
            source, self.spec.image_size, channels=getattr(self.spec, "channels", 1)
        )
        return self.predict_images(image[np.newaxis])[0]
