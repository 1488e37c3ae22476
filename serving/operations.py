"""Running the service inside BentoML's processes: the environment, readiness and metrics.

Everything here is about the processes ``bentoml serve`` starts, not about a request:

- :func:`prepare_process`, run once when a process imports the service: a relative
  ``BENTOML_HOME`` made absolute, BentoML's request metrics labelled by route, and a worker
  stopped with its arbiter (``PR_SET_PDEATHSIG``).
- :func:`model_ready`, the entry service's ``/readyz``: asks the model worker, never waits long.
- :class:`Metrics`, the service's own Prometheus metrics on ``/metrics`` (abstentions, OOD
  scores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
import numpy as np

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
# /readyz asks the model worker's /readyz and gives up (503) after this many seconds.
READY_TIMEOUT_S = 2.0


def prepare_process() -> None:
    """Ready this process for serving (called when the service module is imported, in the
    arbiter and in every worker): :func:`absolute_bentoml_home`,
    :func:`label_requests_by_route`, :func:`stop_with_the_arbiter`, in that order."""
    absolute_bentoml_home()
    label_requests_by_route()
    stop_with_the_arbiter()


def absolute_bentoml_home(module_file: str = __file__) -> str | None:
    """Make a relative ``BENTOML_HOME`` absolute in this process's environment; the value set,
    or None when there was nothing to do.

    ``bentoml serve`` imports the service (and so this module) in its own process before it
    starts the workers with a copy of its environment, and each worker changes directory to the
    Bento's ``src/`` before it opens the model store: with the README's
    ``BENTOML_HOME=.bentoml`` the model worker looked for ``src/.bentoml`` and crash-looped.
    Served from the store, this file is ``<home>/bentos/<name>/<version>/src/serving/<file>.py``
    whatever the working directory,
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


def route_label(path: str) -> str:
    """The ``endpoint`` label of a request to ``path``: the route it is, or ``UNKNOWN_ROUTE``."""
    if path in KNOWN_ROUTES:
        return path
    for prefix, template in TEMPLATED_ROUTES.items():
        if path.startswith(prefix):
            return template
    return UNKNOWN_ROUTE


def label_requests_by_route() -> None:
    """Make BentoML's request metrics label each request by its route, not its raw URL path.

    BentoML 1.4.39's metrics middleware (outside any middleware a service may add) labels
    requests with ``scope["path"]``: 5,300 unknown paths made ``/metrics`` 23.8 MB and 11.6 s
    a scrape. Its metrics are created in ``_setup``; this wraps their ``labels`` so that the
    ``endpoint`` label goes through :func:`route_label`. A BentoML without that middleware is
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
    """``metric.labels(endpoint=path, ...)`` becomes ``labels(endpoint=route_label(path), ...)``."""
    labels = metric.labels

    def by_route(*args, **kwargs):
        if "endpoint" in kwargs:
            kwargs["endpoint"] = route_label(kwargs["endpoint"])
        return labels(*args, **kwargs)

    metric.labels = by_route


def stop_with_the_arbiter() -> None:
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


async def model_ready(student, timeout_s: float = READY_TIMEOUT_S) -> bool:
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


class Metrics:
    """Prometheus metrics on BentoML's ``/metrics``: abstentions and the OOD score histogram.

    Created in the worker (BentoML sets up Prometheus' multi-process mode before it builds the
    service, after the service module is imported), with the OOD threshold the histogram's
    buckets sit around (None: a fixed range).
    """

    def __init__(self, ood_threshold: float | None) -> None:
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
            buckets=_score_buckets(ood_threshold),
        )

    def observe(self, route: str, score: float, abstained: bool) -> None:
        if np.isfinite(score):
            self.scores.labels(route=route).observe(score)
        if abstained:
            self.abstentions.labels(route=route).inc()


def _score_buckets(threshold: float | None) -> list[float]:
    """Histogram buckets around ``threshold``: 0.25x ... 4x of it (or a fixed range)."""
    if threshold is None or threshold <= 0:
        return [0.1 * i for i in range(1, 11)] + [float("inf")]
    factors = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
    return [threshold * f for f in factors] + [float("inf")]
