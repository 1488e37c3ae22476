"""The medtransfer BentoML service: classify DICOM (and PNG) uploads with the approved student.

Two services, one Bento (``medtransfer package`` builds it; ``serving/bentofile.yaml``):

- :class:`StudentModel` holds the student (loaded with :func:`tasks.student_io.load_student`
  from the Bento's model) and exposes one batchable call, uint8 images ``(B, S, S)`` →
  probabilities ``(B, C)``. BentoML's adaptive batching groups concurrent calls into one forward
  pass (``serving.max_batch_size`` images, waiting at most ``serving.max_latency_ms``).
- :class:`Classifier`, the HTTP entry point, reads and checks uploads and prepares them with
  :mod:`tasks.inference` (the training preprocessing, imported, not copied), then calls the
  model service. Its routes:

  ========================  ======================================  ==========================
  route                     body                                    reply
  ========================  ======================================  ==========================
  POST /classify/dicom      one DICOM file, ``application/dicom``   label, probabilities, ...
  POST /classify/png        one PNG, ``image/png``                  same
  POST /classify/batch      ``multipart/form-data``, parts          ``results``: one per file
                            named ``files``, one DICOM each
  GET  /info                                                        model, classes, limits
  GET  /healthz /livez      (BentoML)                               200 while the server lives
  GET  /readyz              (BentoML)                               200 once the model loaded
  ========================  ======================================  ==========================

Bad input gets a 4xx with ``{"error": code, "message": ..., "status": ...}`` (codes in
:data:`tasks.inference.REJECTIONS`), never a 500. The one 5xx is 503 ``model_unavailable``
(with ``Retry-After``) when the model service sheds a call it cannot finish within
``max_latency_ms`` or is restarting. Replies and log lines carry reason codes and
fixed messages only: no DICOM attribute, file name or decoder text, so no patient data.

Configuration comes from the Bento's arguments (:class:`ServingArgs`), written by
``medtransfer package`` from params.yaml and the registry version.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

# pydicom warns about odd attribute values by quoting them: never let one reach the log.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.ERROR)

from tasks.model.inference import (  # noqa: E402 - after the warning filters above
    InputRejected,
    Predictor,
    decide,
    prepare_dicom,
    prepare_png,
)

logger = logging.getLogger("medtransfer.serving")

DICOM_TYPES = ("application/dicom", "application/octet-stream")
PNG_TYPES = ("image/png",)
MULTIPART_TYPES = ("multipart/form-data",)
MODEL_CALL_ATTEMPTS = 3


class ServingArgs(BaseModel):
    """The Bento's arguments (``bentoml build --arg``; set by ``medtransfer package``)."""

    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model_tag: str
    model_name: str = "medtransfer-student"
    model_version: str = ""
    dataset_version: str = ""
    classes: list[str]
    image_size: int
    threshold: float | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    max_batch_files: int = 64
    max_image_dim: int = 8192
    batching: bool = True
    max_batch_size: int = 8
    max_latency_ms: int = 5000
    model_threads: int = 1


ARGS = bentoml.use_arguments(ServingArgs)


@bentoml.service(
    name="medtransfer-student-model",
    workers=1,
    traffic={"timeout": 120},
    # BentoML 1.4.39 replaces the caller's connection pool to this service every 100 requests
    # (or 5 minutes) and closes the old pool under calls still in flight, which then fail or
    # hang (bentoml/BentoML#5540, #5698). The connection is a local socket: keep one pool.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
)
class StudentModel:
    """The student, one batchable forward pass."""

    bento_model = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        if ARGS.model_threads > 0:
            import torch

            torch.set_num_threads(ARGS.model_threads)
        # BentoML starts answering for this worker only after __init__ returns, and the entry
        # service's /readyz asks this one's: ready means the student is in memory.
        self.predictor: Predictor | None = Predictor.from_folder(self.bento_model.path)

    def __is_ready__(self) -> bool:
        """``/readyz`` answers 200 only once the student is loaded."""
        return self.predictor is not None

    @bentoml.api(
        batchable=ARGS.batching,
        max_batch_size=max(ARGS.max_batch_size, 2),
        max_latency_ms=ARGS.max_latency_ms,
    )
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``(B, S, S)`` → class probabilities ``(B, C)`` float32."""
        assert self.predictor is not None
        return self.predictor.predict_images(np.asarray(images, dtype=np.uint8))


app = FastAPI(title="medtransfer", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.service(name="medtransfer", workers=1, traffic={"timeout": 120})
@bentoml.asgi_app(app, path="/")
class Classifier:
    """HTTP entry point: checks and prepares uploads, asks :class:`StudentModel`, replies."""

    student = bentoml.depends(StudentModel)

    @app.get("/info")
    async def info(self) -> JSONResponse:
        """What is served: model, version, dataset, classes, threshold, input limits."""
        return JSONResponse(
            {
                "model": _model_block(),
                "classes": ARGS.classes,
                "image_size": ARGS.image_size,
                "threshold": ARGS.threshold,
                "limits": {
                    "max_upload_bytes": ARGS.max_upload_bytes,
                    "max_batch_files": ARGS.max_batch_files,
                    "max_image_dim": ARGS.max_image_dim,
                },
                "batching": {
                    "enabled": ARGS.batching,
                    "max_batch_size": ARGS.max_batch_size,
                    "max_latency_ms": ARGS.max_latency_ms,
                },
                "model_threads": ARGS.model_threads,
            }
        )

    @app.post("/classify/dicom")
    async def classify_dicom(self, request: Request) -> JSONResponse:
        """One single-frame DICOM file as the request body (``application/dicom``)."""
        return await self._classify_one(request, DICOM_TYPES, prepare_dicom)

    @app.post("/classify/png")
    async def classify_png(self, request: Request) -> JSONResponse:
        """One PNG image as the request body (``image/png``)."""
        return await self._classify_one(request, PNG_TYPES, prepare_png)

    async def _classify_one(
        self,
        request: Request,
        types: tuple[str, ...],
        prepare: Callable[[bytes, int, int], np.ndarray],
    ) -> JSONResponse:
        """Shared body of the single-image endpoints: check the content type, read the body,
        ``prepare`` it into one model-ready image, predict; the decision as JSON, or a 4xx."""
        try:
            _check_content_type(request, types)
            body = await _read_body(request, ARGS.max_upload_bytes)
            image = await _in_thread(prepare, body, ARGS.image_size, ARGS.max_image_dim)
            probs = await self._predict(image[np.newaxis])
        except InputRejected as err:
            return _rejection(request, err)
        except ModelUnavailable:
            return _unavailable()
        return JSONResponse({**_decision(probs[0]), **_served_by()})

    @app.post("/classify/batch")
    async def classify_batch(self, request: Request) -> JSONResponse:
        """Several DICOM files as ``multipart/form-data`` parts named ``files``.

        One bad file rejects the whole request, naming the file's position (from 0).
        """
        try:
            _check_content_type(request, MULTIPART_TYPES)
            body = await _read_body(request, ARGS.max_upload_bytes)
            files = await _multipart_files(request, body, ARGS.max_batch_files)
            images = await _in_thread(_prepare_all, files)
            probs = await self._predict(images)
        except InputRejected as err:
            return _rejection(request, err)
        except ModelUnavailable:
            return _unavailable()
        results = [{"index": i, **_decision(p)} for i, p in enumerate(probs)]
        return JSONResponse({"results": results, **_served_by()})

    async def _predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of ``images``, in chunks no larger than one model batch.

        Raises:
            ModelUnavailable: the model service failed or shed the call (BentoML's batcher
                refuses calls that would exceed ``max_latency_ms``).
        """
        step = max(ARGS.max_batch_size, 1)
        parts = []
        for start in range(0, len(images), step):
            parts.append(await self._call_model(images[start : start + step]))
        return np.concatenate(parts)

    async def _call_model(self, images: np.ndarray) -> np.ndarray:
        """One call of the model service, retried when only the connection failed.

        A call that failed only because its connection was lost (the model worker restarted,
        or BentoML's client replaced its connection pool under it: see ``StudentModel``) is
        sent again: a prediction has no side effect.
        """
        import aiohttp

        for attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                return await self.student.to_async.predict(images)
            except (aiohttp.ClientConnectionError, RuntimeError) as err:
                connection_lost = not isinstance(err, RuntimeError) or "closed" in str(err)
                if not connection_lost or attempt == MODEL_CALL_ATTEMPTS - 1:
                    logger.warning("model call failed: %s", type(err).__name__)
                    raise ModelUnavailable from None
            except Exception as err:  # e.g. 503 from the batcher's load shedding
                logger.warning("model call failed: %s", type(err).__name__)  # the type only
                raise ModelUnavailable from None
        raise ModelUnavailable


class ModelUnavailable(Exception):
    """The model service did not answer (overloaded, restarting): the client may retry."""


def _unavailable() -> JSONResponse:
    return JSONResponse(
        {
            "error": "model_unavailable",
            "message": "The model is overloaded or restarting; retry shortly.",
            "status": 503,
        },
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _prepare_all(files: list[bytes]) -> np.ndarray:
    images = []
    for index, data in enumerate(files):
        try:
            images.append(prepare_dicom(data, ARGS.image_size, ARGS.max_image_dim))
        except InputRejected as err:
            raise InputRejected(err.reason, where=f"File {index}: ") from None
    return np.stack(images)


def _check_content_type(request: Request, accepted: tuple[str, ...]) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in accepted:
        raise InputRejected("unsupported_media_type", hint=f" Send {' or '.join(accepted)}.")


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InputRejected("bad_request")
        if int(declared) > limit:
            raise InputRejected("payload_too_large", hint=f" The limit is {limit} bytes.")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body declares no length: count as it arrives
                raise InputRejected("payload_too_large", hint=f" The limit is {limit} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InputRejected("bad_request") from None
    body = b"".join(chunks)
    if not body:
        raise InputRejected("empty_body")
    return body


async def _multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    """The ``files`` parts of a multipart body, as bytes."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers,
        stream(),
        max_files=max_files + 1,  # one more than allowed, to tell "too many" apart
        max_fields=max_files + 16,
        max_part_size=64 * 1024,  # non-file fields are small; files are spooled to disk
    )
    try:
        form = await parser.parse()
    except Exception:  # MultiPartException and python-multipart's own parser errors
        raise InputRejected("bad_multipart") from None
    try:
        parts = form.getlist("files")
        if len(parts) > max_files:
            raise InputRejected("too_many_files", hint=f" The limit is {max_files} files.")
        if not parts or not all(isinstance(p, UploadFile) for p in parts):
            raise InputRejected("no_files")
        return [await part.read() for part in parts]
    finally:
        await form.close()


async def _in_thread(function, *args):
    """Run CPU-bound decoding off the event loop."""
    import anyio

    return await anyio.to_thread.run_sync(function, *args)


def _decision(probs: np.ndarray) -> dict:
    decision = decide(probs, ARGS.classes, ARGS.threshold)
    return {"label": decision.label, "probabilities": decision.probabilities}


def _model_block() -> dict:
    return {
        "name": ARGS.model_name,
        "version": ARGS.model_version,
        "dataset_version": ARGS.dataset_version,
        "bento_model": ARGS.model_tag,
    }


def _served_by() -> dict:
    return {"threshold": ARGS.threshold, "model": _model_block()}


def _rejection(request: Request, err: InputRejected) -> JSONResponse:
    # Reason code and route only: nothing from the upload is logged.
    logger.info("rejected %s with %d: %s", request.url.path, err.status, err.reason)
    return JSONResponse(err.to_dict(), status_code=err.status)
