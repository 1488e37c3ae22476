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
  :class:`serving.uploads.UploadLimits`, which enforces the limits before BentoML reads a body.

  ========================  ======================================  ==========================
  route                     body                                    reply
  ========================  ======================================  ==========================
  POST /classify/dicom      one DICOM file, ``application/dicom``   label, probabilities, ood;
                            (``Accept: application/dicom``)         SR + Grad-CAM SC, DICOM
  POST /classify/png        one PNG, ``image/png``                  same
  POST /classify/batch      ``multipart/form-data``, parts          ``results``: one per file
                            named ``files``, one DICOM each
  GET  /info                                                        model, classes, limits
  GET  /healthz /livez      (BentoML)                               200 while the server lives
  GET  /readyz              (BentoML)                               200 while the model answers
  GET  /metrics             (Prometheus)                            requests by route, abstentions, OOD scores
  GET  /docs /docs.json     (BentoML)                               OpenAPI page and schema
  ========================  ======================================  ==========================

Every reply carries the OOD score (``ood``) and the conformal ``prediction_set``
(:mod:`tasks.evaluation.conformal`). At or above the OOD threshold set at packaging on the
validation split (``serving.ood_false_rejection``) the reply is 200 with ``"label": null``,
``"abstained": true``, ``"probabilities": null``, ``"prediction_set": null`` and the reason:
never a diagnosis. A DICOM whose Modality, Photometric Interpretation or Body Part is outside
the training data's is refused with 422 ``out_of_scope``. A multi-frame DICOM is read the way
the model's ingestion read it (the ``multiframe`` rule recorded with the model).

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

Beside this module, by concern: :mod:`serving.uploads` (the checks before a body is read),
:mod:`serving.limits` (the request deadline and the decode slots), :mod:`serving.replies` (the
4xx and 503 answers), :mod:`serving.operations`
(BentoML's processes: ``BENTOML_HOME``, the parent-death signal, ``/readyz``),
:mod:`serving.metrics` (``/metrics``: requests labelled by route, abstentions, OOD scores); :mod:`serving.dicom_output` (the SR and Grad-CAM SC of a classified
DICOM, multipart/related; sent to ``serving.pacs`` by :mod:`serving.pacs`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response

# tasks.data.dicom_io silences pydicom's logger and warnings after importing pydicom (whose
# import resets its logger); this filter also covers anything imported before it.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

from serving.args import ServingArgs  # noqa: E402
from serving.dicom_output import (  # noqa: E402
    PACS_ENVIRONMENT,
    accepts_dicom,
    dicom_outputs,
    dicom_response,
    pacs_target,
)
from serving.dicom_report import DicomOutputError  # noqa: E402
from serving.limits import DecodeSlots, request_deadline, timed_out  # noqa: E402
from serving.metrics import Metrics, RouteTrafficMetrics, exposition  # noqa: E402
from serving.operations import model_ready, prepare_process  # noqa: E402
from serving.pacs import PacsError, PacsTarget, send  # noqa: E402
from serving.replies import ModelUnavailable, answer, rejection, unavailable  # noqa: E402
from serving.uploads import UploadLimits  # noqa: E402 - imports pydicom: after the filter
from tasks.model.findings import check_findings, findings_decision  # noqa: E402
from tasks.model.inference import (  # noqa: E402 - after the warning filter above
    InputRejected,
    Predictor,
    decide,
    prediction_set,
    prepare_dicom,
    prepare_png,
)
from tasks.model.profile import DataProfile, Scope, features_and_probabilities  # noqa: E402
from tasks.model.request_store import RequestStore  # noqa: E402

logger = logging.getLogger("medtransfer.serving")

MODEL_CALL_ATTEMPTS = 3
# The limits /info shows (ServingArgs fields).
LIMITS = ("max_upload_bytes", "max_batch_files", "max_image_dim", "max_decoded_mib")
LIMITS += ("max_concurrent_decodes", "request_timeout_s")
WRONG_METHODS = ["GET", "PUT", "DELETE", "PATCH"]
ABSTAIN_REASON = (
    "The image is unlike the data the model was trained on (its out-of-distribution score is "
    "at or above the threshold); no diagnosis is given."
)


prepare_process()
ARGS = bentoml.use_arguments(ServingArgs)
# At most serving.max_concurrent_decodes images decode at once in this worker (serving.limits).
DECODES = DecodeSlots(ARGS.max_concurrent_decodes, ARGS.request_timeout_s)
# Where each classified DICOM's SR and SC are C-STOREd (None: nowhere); see serving.dicom_output.
PACS: PacsTarget | None = pacs_target(ARGS.pacs, os.environ.get(PACS_ENVIRONMENT))


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
        if self.predictor.spec.label_kind != "single-label":  # K served must be K trained
            check_findings(self.predictor.spec.classes, ARGS.classes, ARGS.thresholds)
        profile = DataProfile.load(self.bento_model.path)
        # serving.ood_gate false: no score, no abstention (the benchmark's "gate off").
        gate = ARGS.ood_gate and profile is not None
        self.detector = profile.detector if gate else None
        from tasks.model.explain import Explainer

        self.explainer = Explainer(self.predictor.model)

    def __is_ready__(self) -> bool:
        """``/readyz`` answers 200 only once the student is loaded."""
        return self.predictor is not None

    @bentoml.api(
        batchable=ARGS.batching,
        max_batch_size=max(ARGS.max_batch_size, 2),
        max_latency_ms=ARGS.max_latency_ms,
    )
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``(B, S, S)`` (``(B, 3, S, S)`` colour) → float32 ``(B, C + 1)``:
        class probabilities, then the
        OOD score (NaN for a model packaged without a profile)."""
        return self._outputs(np.asarray(images, dtype=np.uint8))

    @bentoml.api(
        batchable=ARGS.batching,
        max_batch_size=max(ARGS.max_batch_size, 2),
        max_latency_ms=ARGS.max_latency_ms,
    )
    def explain(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``(B, S, S)`` → float32 ``(B, C + 1 + S * S)``: :meth:`predict`'s
        output, then each image's Grad-CAM map ``(S, S)`` in [0, 1] of its decided class
        (:func:`tasks.model.inference.decide`'s rule), flattened."""
        images = np.asarray(images, dtype=np.uint8)
        outputs = self._outputs(images)
        return self.explainer.with_maps(images, outputs, ARGS.threshold)

    def _outputs(self, images: np.ndarray) -> np.ndarray:
        assert self.predictor is not None
        # The Grad-CAM hooks see every forward pass of the model: one pass at a time.
        with self.explainer.lock:
            spec = self.predictor.spec
            probs, features = features_and_probabilities(
                self.predictor.model, images, spec.temperature, spec.kind
            )
        scores = np.full(len(images), np.nan)
        if self.detector is not None and features.shape[1]:
            scores = self.detector.score(features)
        return np.concatenate([probs, scores[:, None]], axis=1).astype(np.float32)


info_app = FastAPI(title="medtransfer", docs_url=None, redoc_url=None, openapi_url=None)


# BentoML's own timeout is the backstop (504); the service answers 503 at request_timeout_s.
# BentoML's request metrics label requests by raw URL path (unbounded): off here, and
# serving.metrics records the same series by route and serves /metrics.
@bentoml.service(
    name="medtransfer",
    workers=1,
    traffic={"timeout": ARGS.request_timeout_s + 30},
    metrics={"enabled": False},
)
@bentoml.asgi_app(info_app, path="/")
class Classifier:
    """HTTP entry point: checks and prepares uploads, asks :class:`StudentModel`, replies."""

    student = bentoml.depends(StudentModel)

    def __init__(self) -> None:
        self.scope = Scope(ARGS.scope) if ARGS.scope else None
        # The store's path as packaged (absolute), or the deployment's own.
        store = os.environ.get("MEDTRANSFER_MONITOR_STORE") or ARGS.monitor_store
        self.monitor = RequestStore(store, ARGS.monitor_max_records)
        self.metrics = Metrics(ARGS.ood_threshold)

    async def __is_ready__(self) -> bool:
        """``/readyz``: 200 only while the model worker answers its own ``/readyz``."""
        return await model_ready(self.student)

    @info_app.get("/info")
    async def info(self) -> JSONResponse:
        """What is served: model, version, dataset, classes, threshold, input limits."""
        return JSONResponse(
            {
                "model": _model_block(),
                "classes": ARGS.classes,
                "image_size": ARGS.image_size,
                "channels": ARGS.channels,
                "threshold": ARGS.threshold,
                "label_kind": ARGS.label_kind,
                "thresholds": ARGS.thresholds,
                "limits": {key: getattr(ARGS, key) for key in LIMITS},
                "batching": {
                    "enabled": ARGS.batching,
                    "max_batch_size": ARGS.max_batch_size,
                    "max_latency_ms": ARGS.max_latency_ms,
                },
                "model_threads": ARGS.model_threads,
                "multiframe": ARGS.multiframe,
                "scope": ARGS.scope,
                "ood": {"gate": ARGS.ood_gate, "threshold": ARGS.ood_threshold},
                "sets": {"coverage": ARGS.coverage, "threshold": ARGS.conformal_threshold},
            }
        )

    @info_app.get("/metrics", include_in_schema=False)
    async def metrics_page(self) -> Response:
        """Prometheus' text format: every worker's request series, abstentions, OOD scores."""
        body, content_type = await asyncio.to_thread(exposition)
        return Response(body, media_type=content_type)

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
        self, file: Annotated[Path, ContentType("application/dicom")], /, ctx: bentoml.Context
    ) -> dict:
        """Classify one DICOM file sent as the request body (``application/dicom``).

        With ``Accept: application/dicom`` (or ``multipart/related; type="application/dicom"``)
        the reply is the classification as DICOM: a Comprehensive SR and the Grad-CAM
        Secondary Capture in the source's study, ``multipart/related``. With a PACS configured
        (``serving.pacs``) both are C-STOREd to it too and the reply says how that went.
        """
        wants_dicom = accepts_dicom(ctx.request.headers.get("accept", ""))
        dicom = wants_dicom if wants_dicom or PACS is not None else None
        reply = await self._classify_one("/classify/dicom", file, self._prepare_dicom, dicom)
        return answer(ctx, reply)

    @bentoml.api(route="/classify/png")
    async def classify_png(
        self, file: Annotated[Path, ContentType("image/png")], /, ctx: bentoml.Context
    ) -> dict:
        """Classify one PNG image sent as the request body (``image/png``)."""
        if accepts_dicom(ctx.request.headers.get("accept", "")):
            refusal = InputRejected("dicom_output_needs_dicom")
            return answer(ctx, rejection("/classify/png", refusal, None))
        return answer(ctx, await self._classify_one("/classify/png", file, _prepare_png))

    @bentoml.api(route="/classify/batch")
    async def classify_batch(
        self, files: list[Annotated[Path, ContentType("application/*")]], ctx: bentoml.Context
    ) -> dict:
        """Classify several DICOM files, ``multipart/form-data`` file parts named ``files``.

        One bad file rejects the whole request, naming the file's position (from 0).
        """
        if accepts_dicom(ctx.request.headers.get("accept", "")):
            refusal = InputRejected("dicom_output_per_file")
            return answer(ctx, rejection("/classify/batch", refusal, None))
        return answer(ctx, await self._classify_batch(files))

    async def _classify_batch(self, files: list[Path]) -> Response:
        try:
            with request_deadline(files, ARGS.request_timeout_s):
                images = await DECODES.run(self._prepare_all, files)
                outputs = await self._predict(images)
        except InputRejected as err:
            return rejection("/classify/batch", err, self.monitor)
        except ModelUnavailable:
            return unavailable()
        except TimeoutError:
            return timed_out("/classify/batch")
        results = [
            {"index": i, **self._decision("/classify/batch", o, images[i])}
            for i, o in enumerate(outputs)
        ]
        return JSONResponse({"results": results, **_served_by()})

    async def _classify_one(
        self, route: str, file: Path, prepare: Callable, dicom: bool | None = None
    ) -> Response:
        """Shared body of the single-image routes: ``prepare`` the upload into one model-ready
        image, predict; the decision as JSON, or a 4xx. ``dicom`` (not None): explain too and
        make the DICOM output (:meth:`_dicom_output`; True: as the reply)."""
        try:
            with request_deadline([file], ARGS.request_timeout_s):
                data = file.read_bytes()
                image = await DECODES.run(prepare, data)
                method = "predict" if dicom is None else "explain"
                output = (await self._call_model(image[np.newaxis], method))[0]
        except InputRejected as err:
            return rejection(route, err, self.monitor)
        except ModelUnavailable:
            return unavailable()
        except TimeoutError:
            return timed_out(route)
        width = len(ARGS.classes) + 1
        reply = {**self._decision(route, output[:width], image), **_served_by()}
        if dicom is None:
            return JSONResponse(reply)
        cam = output[width:].reshape(image.shape)
        return await self._dicom_output(route, data, reply, image, cam, dicom)

    async def _dicom_output(self, route, data, reply, image, cam, wants_dicom) -> Response:
        """Build the SR and SC (:func:`serving.dicom_output.dicom_outputs`), send them to the
        PACS if there is one; reply with them (``wants_dicom``) or as JSON with a ``pacs``
        block. A PACS failure never fails the classification."""
        import anyio

        try:
            outputs = await anyio.to_thread.run_sync(
                dicom_outputs, data, reply, image, cam, ARGS.max_image_dim
            )
        except DicomOutputError:
            if wants_dicom:
                return rejection(route, InputRejected("dicom_output_unavailable"), None)
            return JSONResponse({**reply, "pacs": PacsError("dicom_output_unavailable").to_dict()})
        if PACS is not None:
            reply["pacs"] = await send(outputs, PACS, route)
        return dicom_response(outputs, reply.get("pacs")) if wants_dicom else JSONResponse(reply)

    def _prepare_dicom(self, data: bytes) -> np.ndarray:
        """DICOM bytes → the model's uint8 image, refusing what is outside the training scope."""
        return prepare_dicom(
            data,
            ARGS.image_size,
            ARGS.max_image_dim,
            ARGS.multiframe,
            scope=self.scope,
            max_decoded_bytes=ARGS.max_decoded_mib * 2**20,
            channels=ARGS.channels,
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
                "prediction_set": None,  # an abstention is never an answer
                "abstained": True,
                "reason": ABSTAIN_REASON,
                "ood": ood,
            }
        if ARGS.label_kind == "multi-label":  # each finding decided on its own; no sets
            found = findings_decision(probs, ARGS.classes, ARGS.thresholds or [])
            return {**found, "prediction_set": None, "abstained": False, "ood": ood}
        decision = decide(probs, ARGS.classes, ARGS.threshold)
        chosen = prediction_set(probs, ARGS.classes, ARGS.coverage, ARGS.conformal_threshold, image)
        return {
            "label": decision.label,
            "probabilities": decision.probabilities,
            "prediction_set": chosen,
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

    async def _call_model(self, images: np.ndarray, method: str = "predict") -> np.ndarray:
        """One call of the model service's ``method`` (``predict`` or ``explain``), retried
        when only the connection failed.

        A call that failed only because its connection was lost (the model worker restarted,
        or BentoML's client replaced its connection pool under it: see ``StudentModel``) is
        sent again: a prediction has no side effect.
        """
        import aiohttp

        for attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                return await getattr(self.student.to_async, method)(images)
            except (aiohttp.ClientConnectionError, RuntimeError) as err:
                connection_lost = not isinstance(err, RuntimeError) or "closed" in str(err)
                if not connection_lost or attempt == MODEL_CALL_ATTEMPTS - 1:
                    logger.warning("model call failed: %s", type(err).__name__)
                    raise ModelUnavailable from None
            except Exception as err:  # e.g. 503 from the batcher's load shedding
                logger.warning("model call failed: %s", type(err).__name__)  # the type only
                raise ModelUnavailable from None
        raise ModelUnavailable


# Outermost of ours: every request is counted, the uploads UploadLimits refuses (413) included.
Classifier.add_asgi_middleware(RouteTrafficMetrics)
Classifier.add_asgi_middleware(
    UploadLimits, max_bytes=ARGS.max_upload_bytes, max_files=ARGS.max_batch_files
)


def _prepare_png(data: bytes) -> np.ndarray:
    return prepare_png(
        data,
        ARGS.image_size,
        ARGS.max_image_dim,
        max_decoded_bytes=ARGS.max_decoded_mib * 2**20,
        channels=ARGS.channels,
    )


def _model_block() -> dict:
    return {
        "name": ARGS.model_name,
        "version": ARGS.model_version,
        "dataset_version": ARGS.dataset_version,
        "bento_model": ARGS.model_tag,
        "approved": ARGS.approved,
        "approval": ARGS.approval,
    }


def _served_by() -> dict:
    return {"threshold": ARGS.threshold, "model": _model_block()}
