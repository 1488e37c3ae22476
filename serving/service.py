"""The medtransfer BentoML service: classify DICOM (and PNG) uploads with the approved student,
and say so when an upload is unlike what it was trained on.

Two services, one Bento (``medtransfer package`` builds it; ``serving/bentofile.yaml``):

- :class:`StudentModel` holds the student (loaded with :func:`tasks.model.student_io.load_student`
  from the Bento's model) and the training data's profile recorded with it
  (:mod:`tasks.model.profile`), and exposes one batchable call, uint8 images ``(B, S, S)`` →
  ``(B, C + 1)``: the class probabilities (through :mod:`tasks.model.inference`, calibration
  included) and the out-of-distribution score of the student's own features. BentoML's adaptive
  batching groups concurrent calls into one forward pass.
- :class:`Classifier`, the HTTP entry point: typed ``@bentoml.api`` routes (so ``/docs`` has a
  schema and an upload form for each, and ``bentoml.SyncHTTPClient`` works), behind
  :class:`UploadLimits`, which enforces the limits before BentoML reads a body.

  ========================  ======================================  ==========================
  route                     body                                    reply
  ========================  ======================================  ==========================
  POST /classify/dicom      one DICOM file, ``application/dicom``   label, probabilities, ood
  POST /classify/png        one PNG, ``image/png``                  same
  POST /classify/batch      ``multipart/form-data``, parts          ``results``: one per file
                            named ``files``, one DICOM each
  GET  /info                                                        model, classes, limits
  GET  /healthz /livez      (BentoML)                               200 while the server lives
  GET  /readyz              (BentoML)                               200 while the model answers
  GET  /metrics             (BentoML, Prometheus)                   abstentions, OOD scores
  GET  /docs /docs.json     (BentoML)                               OpenAPI page and schema
  ========================  ======================================  ==========================

Every reply carries the OOD score (``ood``). At or above the threshold set at packaging on the
validation split (``serving.ood_false_rejection``) the reply is 200 with ``"label": null``,
``"abstained": true``, ``"probabilities": null`` and the reason: never a diagnosis. A DICOM whose
Modality, Photometric Interpretation or Body Part is outside the training data's is refused with
422 ``out_of_scope``. A multi-frame DICOM is read the way the model's ingestion read it (the
``multiframe`` rule recorded with the model).

Bad input gets a 4xx with ``{"error": code, "message": ..., "status": ...}`` (codes in
:data:`tasks.model.inference.REJECTIONS`), never a 500. The 5xx are 503
``model_unavailable`` and 503 ``request_timeout`` (not done within ``serving.request_timeout_s``; its upload is removed),
both with ``Retry-After``. Uploads are checked against the size their own codestream declares
before decoding (:mod:`tasks.data.codestream`), and at most ``serving.max_concurrent_decodes``
decode at once. Replies and log lines carry reason codes and fixed messages only: no
DICOM attribute, file name or decoder text, so no patient data. Per request the service keeps
only non-identifying numbers (OOD score, probabilities, three image statistics) in a bounded
SQLite store (``serving.monitor_store``) for ``medtransfer monitor``.

Configuration comes from the Bento's arguments (:class:`ServingArgs`), written by
``medtransfer package`` from params.yaml, the registry version and the recorded profile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict

# tasks.data.dicom_io silences pydicom's logger and warnings after importing pydicom (whose
# import resets its logger); this filter also covers anything imported before it.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

from tasks.model.inference import (  # noqa: E402 - after the warning filter above
    InputRejected,
    Predictor,
    decide,
    prepare_dicom,
    prepare_png,
)
from tasks.model.profile import (  # noqa: E402
    DataProfile,
    Scope,
    features_and_probabilities,
)
from tasks.model.request_store import RequestStore  # noqa: E402

logger = logging.getLogger("medtransfer.serving")

DICOM_TYPES = ("application/dicom", "application/octet-stream")
PNG_TYPES = ("image/png",)
MULTIPART_TYPES = ("multipart/form-data",)
MODEL_CALL_ATTEMPTS = 3
# The paths /metrics labels by name (this service's routes, the model worker's and BentoML's);
# every other path is counted under UNKNOWN_ROUTE, so that scanning URLs cannot grow /metrics.
KNOWN_ROUTES = frozenset(
    {
        "/classify/dicom",
        "/classify/png",
        "/classify/batch",
        "/info",
        "/docs",
        "/docs.json",
        "/",
        "/healthz",
        "/livez",
        "/readyz",
        "/metrics",
        "/predict",
    }
)
TEMPLATED_ROUTES = {"/static_content/": "/static_content/{path}"}
UNKNOWN_ROUTE = "/__unknown__"
# A multipart file name longer than this is refused (BentoML's temporary file keeps it as a
# suffix after an 11-character prefix, and file names end at 255 bytes).
MAX_FILE_NAME_BYTES = 200
# /readyz asks the model worker's /readyz and gives up (503) after this many seconds.
READY_TIMEOUT_S = 2.0
WRONG_METHODS = ["GET", "PUT", "DELETE", "PATCH"]
ABSTAIN_REASON = (
    "The image is unlike the data the model was trained on (its out-of-distribution score is "
    "at or above the threshold); no diagnosis is given."
)


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
    max_decoded_mib: int = 128
    max_concurrent_decodes: int = 1
    request_timeout_s: float = 60.0
    batching: bool = True
    max_batch_size: int = 8
    max_latency_ms: int = 5000
    model_threads: int = 1
    # The training data's rule for multi-frame files (data.multiframe), and its header values.
    multiframe: str | None = None
    scope: dict[str, list[str]] | None = None
    ood_threshold: float | None = None
    ood_gate: bool = True
    monitor_store: str = ""
    monitor_max_records: int = 10000


def _absolute_bentoml_home(module_file: str = __file__) -> str | None:
    """Make a relative ``BENTOML_HOME`` absolute in this process's environment; the value set,
    or None when there was nothing to do.

    ``bentoml serve`` imports this module in its own process before it starts the workers with
    a copy of its environment, and each worker changes directory to the Bento's ``src/`` before
    it opens the model store: with the README's ``BENTOML_HOME=.bentoml`` the model worker
    looked for ``src/.bentoml`` and crash-looped. Served from the store, this file is
    ``<home>/bentos/<name>/<version>/src/serving/service.py`` whatever the working directory,
    so ``<home>`` is the absolute home; served from the project folder (``bentoml serve
    serving.service:Classifier``) the import runs where the relative path was given.
    """
    home = os.environ.get("BENTOML_HOME", "")
    if not home or os.path.isabs(os.path.expanduser(home)):
        return None
    here = Path(module_file).absolute()
    in_store = len(here.parents) > 5 and here.parents[4].name == "bentos"
    absolute = str(here.parents[5]) if in_store else os.path.abspath(home)
    os.environ["BENTOML_HOME"] = absolute
    return absolute


def _route_label(path: str) -> str:
    """The ``endpoint`` label of a request to ``path``: the route it is, or ``UNKNOWN_ROUTE``."""
    if path in KNOWN_ROUTES:
        return path
    for prefix, template in TEMPLATED_ROUTES.items():
        if path.startswith(prefix):
            return template
    return UNKNOWN_ROUTE


def _label_requests_by_route() -> None:
    """Make BentoML's request metrics label each request by its route, not its raw URL path.

    BentoML 1.4.39's metrics middleware (outside any middleware a service may add) labels
    requests with ``scope["path"]``: 5,300 unknown paths made ``/metrics`` 23.8 MB and 11.6 s
    a scrape. Its metrics are created in ``_setup``; this wraps their ``labels`` so that the
    ``endpoint`` label goes through :func:`_route_label`. A BentoML without that middleware is
    left as it is.
    """
    try:
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    except ImportError:  # another BentoML: nothing to wrap
        return
    setup = RunnerTrafficMetricsMiddleware._setup
    if getattr(setup, "by_route", False):
        return

    def setup_by_route(self, *args, **kwargs) -> None:
        setup(self, *args, **kwargs)
        for name in ("metrics_request_total", "metrics_request_duration"):
            _map_endpoint_label(getattr(self, name))
        _map_endpoint_label(self.metrics_request_in_progress)

    setup_by_route.by_route = True  # type: ignore[attr-defined]
    RunnerTrafficMetricsMiddleware._setup = setup_by_route  # type: ignore[method-assign]


def _map_endpoint_label(metric) -> None:
    """``metric.labels(endpoint=path, ...)`` becomes ``labels(endpoint=_route_label(path), ...)``."""
    labels = metric.labels

    def by_route(*args, **kwargs):
        if "endpoint" in kwargs:
            kwargs["endpoint"] = _route_label(kwargs["endpoint"])
        return labels(*args, **kwargs)

    metric.labels = by_route


def _stop_with_the_arbiter() -> None:
    """In a BentoML worker on Linux, have the kernel send SIGTERM when the worker's parent (the
    arbiter of ``bentoml serve``) dies: a SIGKILLed arbiter left its entry worker running. The
    arbiter itself (no worker index) is left to its own parent."""
    if not sys.platform.startswith("linux"):
        return
    if bentoml.server_context.worker_index is None:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


_absolute_bentoml_home()
_label_requests_by_route()
_stop_with_the_arbiter()
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
    """The student and its OOD detector, one batchable forward pass."""

    bento_model = bentoml.models.BentoModel(ARGS.model_tag)

    def __init__(self) -> None:
        if ARGS.model_threads > 0:
            import torch

            torch.set_num_threads(ARGS.model_threads)
        # BentoML starts answering for this worker only after __init__ returns, and the entry
        # service's /readyz asks this one's: ready means the student is in memory.
        self.predictor: Predictor | None = Predictor.from_folder(self.bento_model.path)
        profile = DataProfile.load(self.bento_model.path)
        # serving.ood_gate false: no score, no abstention (the benchmark's "gate off").
        gate = ARGS.ood_gate and profile is not None
        self.detector = profile.detector if gate else None

    def __is_ready__(self) -> bool:
        """``/readyz`` answers 200 only once the student is loaded."""
        return self.predictor is not None

    @bentoml.api(
        batchable=ARGS.batching,
        max_batch_size=max(ARGS.max_batch_size, 2),
        max_latency_ms=ARGS.max_latency_ms,
    )
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``(B, S, S)`` → float32 ``(B, C + 1)``: class probabilities, then the
        OOD score (NaN for a model packaged without a profile)."""
        assert self.predictor is not None
        images = np.asarray(images, dtype=np.uint8)
        probs, features = features_and_probabilities(
            self.predictor.model, images, self.predictor.spec.temperature
        )
        scores = np.full(len(images), np.nan)
        if self.detector is not None and features.shape[1]:
            scores = self.detector.score(features)
        return np.concatenate([probs, scores[:, None]], axis=1).astype(np.float32)


class UploadLimits:
    """ASGI middleware in front of the classify routes: the limits, before BentoML reads a body.

    Per route it checks the Content-Type (415), counts the body as it arrives (413
    ``payload_too_large``; nothing beyond the limit is read), refuses an empty body (400) and a
    body that is a URL (BentoML would download it), and in a multipart body counts the parts
    named ``files``: more than ``max_files`` is always 413 ``too_many_files`` (Starlette's own
    1000-part limit would answer 400 or 500 first), none is 400 ``no_files``, and a ``files``
    part that is not a file is 400 ``bad_multipart``. The checked body is then replayed.
    """

    def __init__(self, app, max_bytes: int, max_files: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.routes = {
            "/classify/dicom": DICOM_TYPES,
            "/classify/png": PNG_TYPES,
            "/classify/batch": MULTIPART_TYPES,
        }

    async def __call__(self, scope, receive, send) -> None:
        accepted = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if accepted is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            content_type = _check_content_type(headers.get("content-type", ""), accepted)
            body = await _read_body(receive, headers.get("content-length"), self.max_bytes)
            if accepted == MULTIPART_TYPES:
                _check_multipart(body, content_type, self.max_files)
                await _parse_multipart(scope, body, self.max_files)
            elif body.lstrip()[:8].lower().startswith((b"http://", b"https://")):
                raise InputRejected("not_png" if accepted == PNG_TYPES else "not_dicom")
        except InputRejected as err:
            logger.info("rejected %s with %d: %s", scope["path"], err.status, err.reason)
            await JSONResponse(err.to_dict(), status_code=err.status)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, _own_errors(send, scope["path"]))


def _own_errors(send, path: str):
    """``send`` with BentoML's own 400 (a pydantic validation error of the typed input, e.g.
    a part's content type) replaced by this service's error body: clients get one format."""
    held: dict = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held["start"] = message  # wait for the body to see whose error it is
            return
        if "start" in held and message["type"] == "http.response.body":
            start, body = held.pop("start"), message.get("body", b"")
            if b'"validation error' in body or b"validation error for" in body:
                reason = "bad_multipart" if path.endswith("/batch") else "bad_request"
                error = InputRejected(reason)
                response = JSONResponse(error.to_dict(), status_code=400)
                start = {
                    **start,
                    "headers": [
                        (k, v) for k, v in start["headers"] if k.lower() != b"content-length"
                    ]
                    + [(b"content-length", str(len(response.body)).encode())],
                }
                body = response.body
            await send(start)
            await send({**message, "body": body})
            return
        await send(message)

    return wrapped


async def _parse_multipart(scope, body: bytes, max_files: int) -> None:
    """Parse the body as BentoML will (Starlette's parser): 400 ``bad_multipart`` when it does
    not parse (BentoML would answer 500), when a ``files`` entry is not a file or when there
    are parts of other names; 400 ``no_files`` without a ``files`` part."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body

    parser = MultiPartParser(
        Headers(scope=scope), stream(), max_files=max_files, max_fields=max_files + 16
    )
    try:
        form = await parser.parse()
    except Exception:  # MultiPartException and python-multipart's own parser errors
        raise InputRejected("bad_multipart") from None
    try:
        parts = form.getlist("files")
        if not parts:
            raise InputRejected("no_files")
        if set(form.keys()) != {"files"}:
            # Kept out: BentoML JSON-decodes every other part and answers 500 on binary ones.
            raise InputRejected("bad_multipart", hint=" Send only parts named 'files'.")
        if not all(isinstance(p, UploadFile) for p in parts):
            raise InputRejected("bad_multipart", hint=" Send each file as a file part.")
        _check_file_names([p.filename or "" for p in parts])
    finally:
        await form.close()


def _check_file_names(names: list[str]) -> None:
    """400 ``bad_multipart`` for a part's file name that BentoML cannot turn into a temporary
    file name (it keeps the client's name as the suffix: longer than the file system allows,
    it raised ``File name too long`` and answered 500 with the name in the log; a NUL byte is
    refused by the OS). The name itself is never echoed."""
    for name in names:
        base = os.path.basename(name)
        if len(base.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES or "\x00" in base:
            raise InputRejected(
                "bad_multipart",
                hint=f" Keep each file name under {MAX_FILE_NAME_BYTES} bytes, without NUL.",
            )


def _check_content_type(header: str, accepted: tuple[str, ...]) -> str:
    """The media type and its parameters; 415 unless the media type is one of ``accepted``."""
    if header.split(";")[0].strip().lower() not in accepted:
        raise InputRejected("unsupported_media_type", hint=f" Send {' or '.join(accepted)}.")
    return header


async def _read_body(receive, declared: str | None, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    if declared is not None:
        if not declared.strip().isdigit():
            raise InputRejected("bad_request")
        if int(declared) > limit:
            raise InputRejected("payload_too_large", hint=f" The limit is {limit} bytes.")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InputRejected("bad_request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a chunked body declares no length: count as it arrives
            raise InputRejected("payload_too_large", hint=f" The limit is {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if not body:
        raise InputRejected("empty_body")
    return body


def _check_multipart(body: bytes, content_type: str, max_files: int) -> None:
    """Count the parts named ``files`` of a multipart body (only their headers are read)."""
    boundary = ""
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise InputRejected("bad_multipart")
    delimiter = b"--" + boundary.encode("latin-1")
    files, position = 0, body.find(delimiter)
    while position >= 0:
        start = position + len(delimiter)
        if body[start : start + 2] == b"--":
            break  # the closing delimiter
        end = body.find(b"\r\n\r\n", start, start + 16384)
        if end < 0:
            break  # cut off inside a part's headers
        head = body[start:end].lower()
        if b'name="files"' in head or b"name=files" in head:
            if b"filename=" not in head:
                raise InputRejected("bad_multipart", hint=" Send each file as a file part.")
            files += 1
            if files > max_files:
                raise InputRejected("too_many_files", hint=f" The limit is {max_files} files.")
        position = body.find(delimiter, end)
    if files == 0:
        raise InputRejected("no_files")


info_app = FastAPI(title="medtransfer", docs_url=None, redoc_url=None, openapi_url=None)


# BentoML's own timeout is the backstop (504); the service answers 503 at request_timeout_s.
@bentoml.service(name="medtransfer", workers=1, traffic={"timeout": ARGS.request_timeout_s + 30})
@bentoml.asgi_app(info_app, path="/")
class Classifier:
    """HTTP entry point: checks and prepares uploads, asks :class:`StudentModel`, replies."""

    student = bentoml.depends(StudentModel)

    def __init__(self) -> None:
        self.scope = Scope(ARGS.scope) if ARGS.scope else None
        # The store's path as packaged (absolute), or the deployment's own.
        store = os.environ.get("MEDTRANSFER_MONITOR_STORE") or ARGS.monitor_store
        self.monitor = RequestStore(store, ARGS.monitor_max_records)
        self.metrics = _Metrics()

    async def __is_ready__(self) -> bool:
        """``/readyz``: 200 only while the model worker answers its own ``/readyz``."""
        return await _model_ready(self.student)

    @info_app.get("/info")
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
                    "max_decoded_mib": ARGS.max_decoded_mib,
                    "max_concurrent_decodes": ARGS.max_concurrent_decodes,
                    "request_timeout_s": ARGS.request_timeout_s,
                },
                "batching": {
                    "enabled": ARGS.batching,
                    "max_batch_size": ARGS.max_batch_size,
                    "max_latency_ms": ARGS.max_latency_ms,
                },
                "model_threads": ARGS.model_threads,
                "multiframe": ARGS.multiframe,
                "scope": ARGS.scope,
                "ood": {"gate": ARGS.ood_gate, "threshold": ARGS.ood_threshold},
            }
        )

    @info_app.get("/docs", include_in_schema=False)
    async def docs(self) -> RedirectResponse:
        """BentoML serves its OpenAPI page (Swagger UI, an upload form per route) at ``/``."""
        return RedirectResponse("/")

    @info_app.api_route("/classify/dicom", methods=WRONG_METHODS, include_in_schema=False)
    @info_app.api_route("/classify/png", methods=WRONG_METHODS, include_in_schema=False)
    @info_app.api_route("/classify/batch", methods=WRONG_METHODS, include_in_schema=False)
    async def wrong_method(self) -> JSONResponse:
        """The classify routes take POST only (BentoML's routes answer POST; other methods
        reach this app)."""
        return JSONResponse({"error": "method_not_allowed"}, status_code=405)

    @bentoml.api(route="/classify/dicom")
    async def classify_dicom(
        self, file: Annotated[Path, ContentType("application/dicom")], /
    ) -> dict:
        """Classify one DICOM file sent as the request body (``application/dicom``)."""
        return await self._classify_one("/classify/dicom", file, self._prepare_dicom)

    @bentoml.api(route="/classify/png")
    async def classify_png(self, file: Annotated[Path, ContentType("image/png")], /) -> dict:
        """Classify one PNG image sent as the request body (``image/png``)."""
        return await self._classify_one("/classify/png", file, _prepare_png)

    @bentoml.api(route="/classify/batch")
    async def classify_batch(
        self, files: list[Annotated[Path, ContentType("application/*")]]
    ) -> dict:
        """Classify several DICOM files, ``multipart/form-data`` file parts named ``files``.

        One bad file rejects the whole request, naming the file's position (from 0).
        """
        try:
            with _request_deadline(files):
                images = await _in_thread(self._prepare_all, files)
                outputs = await self._predict(images)
        except InputRejected as err:
            return _rejection("/classify/batch", err, self.monitor)
        except ModelUnavailable:
            return _unavailable()
        except TimeoutError:
            return _timed_out("/classify/batch")
        results = [
            {"index": i, **self._decision("/classify/batch", o, images[i])}
            for i, o in enumerate(outputs)
        ]
        return JSONResponse({"results": results, **_served_by()})

    async def _classify_one(self, route: str, file: Path, prepare: Callable) -> JSONResponse:
        """Shared body of the single-image routes: ``prepare`` the upload into one model-ready
        image, predict; the decision as JSON, or a 4xx."""
        try:
            with _request_deadline([file]):
                image = await _in_thread(prepare, file.read_bytes())
                outputs = await self._predict(image[np.newaxis])
        except InputRejected as err:
            return _rejection(route, err, self.monitor)
        except ModelUnavailable:
            return _unavailable()
        except TimeoutError:
            return _timed_out(route)
        return JSONResponse({**self._decision(route, outputs[0], image), **_served_by()})

    def _prepare_dicom(self, data: bytes) -> np.ndarray:
        """DICOM bytes → the model's uint8 image, refusing what is outside the training scope."""
        return prepare_dicom(
            data,
            ARGS.image_size,
            ARGS.max_image_dim,
            ARGS.multiframe,
            scope=self.scope,
            max_decoded_bytes=ARGS.max_decoded_mib * 2**20,
        )

    def _prepare_all(self, files: list[Path]) -> np.ndarray:
        images = []
        for index, path in enumerate(files):
            try:
                images.append(self._prepare_dicom(path.read_bytes()))
            except InputRejected as err:
                raise InputRejected(err.reason, where=f"File {index}: ", hint=err.hint) from None
        if not images:
            raise InputRejected("no_files")
        return np.stack(images)

    def _decision(self, route: str, output: np.ndarray, image: np.ndarray) -> dict:
        """One image's reply from the model's ``(C + 1,)`` output; recorded for monitoring."""
        probs, score = output[:-1], float(output[-1])
        threshold = ARGS.ood_threshold
        abstained = bool(
            ARGS.ood_gate and threshold is not None and np.isfinite(score) and score >= threshold
        )
        self.metrics.observe(route, score, abstained)
        self.monitor.record(route, score, probs, image, abstained=abstained, refused=False)
        ood = {
            "score": score if np.isfinite(score) else None,
            "threshold": threshold,
            "out_of_distribution": bool(threshold is not None and score >= threshold),
        }
        if abstained:
            return {
                "label": None,
                "probabilities": None,
                "abstained": True,
                "reason": ABSTAIN_REASON,
                "ood": ood,
            }
        decision = decide(probs, ARGS.classes, ARGS.threshold)
        return {
            "label": decision.label,
            "probabilities": decision.probabilities,
            "abstained": False,
            "ood": ood,
        }

    async def _predict(self, images: np.ndarray) -> np.ndarray:
        """Model outputs ``(B, C + 1)`` of ``images``, in chunks no larger than one model batch.

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


Classifier.add_asgi_middleware(
    UploadLimits, max_bytes=ARGS.max_upload_bytes, max_files=ARGS.max_batch_files
)


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


async def _model_ready(student, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Whether the model worker says it is ready within ``timeout_s`` seconds.

    BentoML's own probe of a dependency waited on a worker that was not up (a model worker in a
    crash loop left ``/readyz`` hanging, and the hung probes kept SIGTERM from stopping the
    server): here any failure or delay is "not ready", and ``/readyz`` answers 503 at once.
    """
    import asyncio

    try:
        return bool(await asyncio.wait_for(student.is_ready(timeout_s), timeout_s))
    except Exception:  # not reachable, timed out, closed: all mean "not ready"
        return False


def _prepare_png(data: bytes) -> np.ndarray:
    return prepare_png(
        data, ARGS.image_size, ARGS.max_image_dim, max_decoded_bytes=ARGS.max_decoded_mib * 2**20
    )


# At most serving.max_concurrent_decodes images decode at once in this worker: each may hold
# a few times serving.max_decoded_mib, so together they bound the worker's decoding memory.
_DECODE_SLOTS = threading.BoundedSemaphore(ARGS.max_concurrent_decodes)


async def _in_thread(function, *args):
    """Run CPU-bound decoding off the event loop, holding a decode slot.

    Waits for a slot no longer than the request's deadline (:func:`_request_deadline`); when
    the deadline passes, the request stops waiting (``abandon_on_cancel``) while a decode
    already running finishes in its thread and only then frees its slot, so the bound holds.
    """
    import anyio

    def bounded():
        if not _DECODE_SLOTS.acquire(timeout=ARGS.request_timeout_s):
            raise TimeoutError
        try:
            return function(*args)
        finally:
            _DECODE_SLOTS.release()

    return await anyio.to_thread.run_sync(bounded, abandon_on_cancel=True)


@contextlib.contextmanager
def _request_deadline(uploads: list[Path]) -> Iterator[None]:
    """``with _request_deadline(uploads):`` the request's work within serving.request_timeout_s.

    Past it the work is cancelled and :class:`TimeoutError` raised (the caller answers 503),
    and the uploads' temp files are removed at once: a decode left running in its thread must
    not keep the upload on disk.
    """
    import anyio

    try:
        with anyio.fail_after(ARGS.request_timeout_s):
            yield
    except TimeoutError:
        for upload in uploads:
            upload.unlink(missing_ok=True)
        raise


def _timed_out(route: str) -> JSONResponse:
    """503 ``request_timeout``: the request did not finish within serving.request_timeout_s."""
    logger.info("rejected %s with 503: request_timeout", route)
    return JSONResponse(
        {
            "error": "request_timeout",
            "message": "The request did not finish in time (the server is busy or the image "
            "is slow to decode); retry shortly.",
            "status": 503,
        },
        status_code=503,
        headers={"Retry-After": "5"},
    )


class _Metrics:
    """Prometheus metrics on BentoML's ``/metrics``: abstentions and the OOD score histogram.

    Created in the worker (BentoML sets up Prometheus' multi-process mode before it builds the
    service, after this module is imported).
    """

    def __init__(self) -> None:
        import prometheus_client

        self.abstentions = prometheus_client.Counter(
            "medtransfer_abstentions",
            "Replies that abstained because the image is out of distribution",
            ["route"],
        )
        self.scores = prometheus_client.Histogram(
            "medtransfer_ood_score",
            "Out-of-distribution scores of classified images (the threshold is in /info)",
            ["route"],
            buckets=_score_buckets(),
        )

    def observe(self, route: str, score: float, abstained: bool) -> None:
        if np.isfinite(score):
            self.scores.labels(route=route).observe(score)
        if abstained:
            self.abstentions.labels(route=route).inc()


def _score_buckets() -> list[float]:
    """Histogram buckets around the threshold: 0.25x ... 4x of it (or a fixed range)."""
    threshold = ARGS.ood_threshold
    if threshold is None or threshold <= 0:
        return [0.1 * i for i in range(1, 11)] + [float("inf")]
    factors = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
    return [threshold * f for f in factors] + [float("inf")]


def _model_block() -> dict:
    return {
        "name": ARGS.model_name,
        "version": ARGS.model_version,
        "dataset_version": ARGS.dataset_version,
        "bento_model": ARGS.model_tag,
    }


def _served_by() -> dict:
    return {"threshold": ARGS.threshold, "model": _model_block()}


def _rejection(route: str, err: InputRejected, monitor: RequestStore) -> JSONResponse:
    # Reason code and route only: nothing from the upload is logged.
    logger.info("rejected %s with %d: %s", route, err.status, err.reason)
    if err.reason == "out_of_scope":
        monitor.record(route, float("nan"), None, None, abstained=False, refused=True)
    return JSONResponse(err.to_dict(), status_code=err.status)
