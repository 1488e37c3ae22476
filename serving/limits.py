"""The request's budgets: a deadline for its whole work and a bound on concurrent decodes.

- :func:`request_deadline`: a request not done within ``serving.request_timeout_s`` is
  cancelled, its uploads' temp files removed, and :func:`timed_out` is its reply (503).
- :class:`DecodeSlots`: at most ``serving.max_concurrent_decodes`` images decode at once in a
  worker, abandoned ones included: each may hold a few times ``serving.max_decoded_mib``, so
  together they bound the worker's decoding memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

logger = logging.getLogger("medtransfer.serving")


class DecodeSlots:
    """At most ``slots`` decodes at once in this process, each waiting for a slot no longer
    than ``wait_s`` seconds (the request's deadline)."""

    def __init__(self, slots: int, wait_s: float) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self.wait_s = wait_s

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, CPU-bound decoding, run off the event loop holding a slot.

        Waits for a slot no longer than the request's deadline (:func:`request_deadline`); when
        the deadline passes, the request stops waiting (``abandon_on_cancel``) while a decode
        already running finishes in its thread and only then frees its slot, so the bound holds.

        Raises:
            TimeoutError: no slot came free within ``wait_s`` seconds.
        """
        import anyio

        def bounded():
            if not self._slots.acquire(timeout=self.wait_s):
                raise TimeoutError
            try:
                return function(*args)
            finally:
                self._slots.release()

        return await anyio.to_thread.run_sync(bounded, abandon_on_cancel=True)


@contextlib.contextmanager
def request_deadline(uploads: list[Path], seconds: float) -> Iterator[None]:
    """``with request_deadline(uploads, seconds):`` the request's work within ``seconds``.

    Past it the work is cancelled and :class:`TimeoutError` raised (the caller answers 503),
    and the uploads' temp files are removed at once: a decode left running in its thread must
    not keep the upload on disk.
    """
    import anyio

    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        for upload in uploads:
            upload.unlink(missing_ok=True)
        raise


def timed_out(route: str) -> JSONResponse:
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
