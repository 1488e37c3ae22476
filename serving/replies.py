"""The classify routes' answers other than a classification: a refused upload (4xx), the model
not answering (503), and the status a route that takes BentoML's ``ctx`` must set.

Replies and log lines carry reason codes and fixed messages only (no value from the upload).
"""

from __future__ import annotations

import logging

import bentoml
from fastapi.responses import JSONResponse, Response

from tasks.model.inference import InputRejected
from tasks.model.request_store import RequestStore

logger = logging.getLogger("medtransfer.serving")


class ModelUnavailable(Exception):
    """The model service did not answer (overloaded, restarting): the client may retry."""


def unavailable() -> JSONResponse:
    """503 ``model_unavailable`` with ``Retry-After``: the answer to :class:`ModelUnavailable`."""
    return JSONResponse(
        {
            "error": "model_unavailable",
            "message": "The model is overloaded or restarting; retry shortly.",
            "status": 503,
        },
        status_code=503,
        headers={"Retry-After": "1"},
    )


def rejection(route: str, err: InputRejected, monitor: RequestStore | None) -> JSONResponse:
    """The 4xx of a refused upload (``err.to_dict()``), logged with its route and reason code;
    an ``out_of_scope`` refusal is recorded in ``monitor`` (when given) for drift monitoring."""
    logger.info("rejected %s with %d: %s", route, err.status, err.reason)
    if err.reason == "out_of_scope" and monitor is not None:
        monitor.record(route, float("nan"), None, None, abstained=False, refused=True)
    return JSONResponse(err.to_dict(), status_code=err.status)


def answer(ctx: bentoml.Context, response: Response) -> Response:
    """``response`` as the route's answer: BentoML gives a route that takes ``ctx`` the status
    of ``ctx.response`` (200 unless set), whatever the returned response's own."""
    ctx.response.status_code = response.status_code
    return response
