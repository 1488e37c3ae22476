"""Everything on the service's ``/metrics``: request metrics labelled by route, and our own.

BentoML 1.4.39's request-metrics middleware labels each request with its raw URL path: 5,300
unknown paths made ``/metrics`` 23.8 MB and 11.6 s a scrape, and a scanner could grow it
without bound. The entry service therefore runs with BentoML's metrics off
(``metrics={"enabled": False}``, which also removes its ``/metrics`` route) and this module
stands in for both, through public APIs only (an ASGI middleware added with
``add_asgi_middleware``, a route on the service's FastAPI app, ``prometheus_client``):

- :class:`RouteTrafficMetrics` records BentoML's request series under BentoML's names and
  labels (``bentoml_service_request_total``, ``..._request_duration_seconds``,
  ``..._request_in_progress``), with ``endpoint`` = :func:`route_label` of the path: a known
  route by name, every other path as ``/__unknown__``.
- :func:`exposition` is ``/metrics``: every worker's series (Prometheus' multi-process files,
  which ``bentoml serve`` sets up for all its workers, the model worker's included).
- :class:`Metrics`: abstentions and the OOD score histogram.
"""

from __future__ import annotations

import os
from timeit import default_timer

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


# BentoML's metric namespace, so that dashboards written for BentoML's series keep working.
NAMESPACE = "bentoml_service"
# Request latency buckets in seconds (BentoML's default range: 5 ms to 1 minute).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Routes whose series exist from the start (200 and 500), as BentoML creates them, so that a
# rate() is defined before the first request.
PLACEHOLDER_ROUTES = ("/classify/dicom", "/classify/png", "/classify/batch")


def route_label(path: str) -> str:
    """The ``endpoint`` label of a request to ``path``: the route it is, or ``UNKNOWN_ROUTE``."""
    if path in KNOWN_ROUTES:
        return path
    for prefix, template in TEMPLATED_ROUTES.items():
        if path.startswith(prefix):
            return template
    return UNKNOWN_ROUTE


class _Series:
    """The three request series, in ``registry`` (None: prometheus_client's default, the one
    the multi-process files stand behind). Created on first use, in the worker: see
    :class:`Metrics`."""

    def __init__(self, registry=None) -> None:
        import prometheus_client

        where = {"namespace": NAMESPACE}
        if registry is not None:
            where["registry"] = registry
        labels = ["endpoint", "service_name", "service_version", "runner_name"]
        coded = [*labels, "http_response_code"]
        self.total = prometheus_client.Counter(
            "request_total", "Total number of requests", coded, **where
        )
        self.duration = prometheus_client.Histogram(
            "request_duration_seconds", "Request duration in seconds", coded,
            buckets=DURATION_BUCKETS, **where,
        )  # fmt: skip
        self.in_progress = prometheus_client.Gauge(
            "request_in_progress", "Requests in progress now", labels,
            multiprocess_mode="livesum", **where,
        )  # fmt: skip
        for route in PLACEHOLDER_ROUTES:
            for code in (200, 500):
                self.total.labels(**request_labels(route), http_response_code=code)


def request_labels(endpoint: str) -> dict[str, str]:
    """The labels BentoML gives a request series, for ``endpoint``."""
    context = bentoml.server_context
    return {
        "endpoint": endpoint,
        "service_name": str(context.bento_name or ""),
        "service_version": str(context.bento_version or ""),
        "runner_name": str(context.service_name or ""),
    }


class RouteTrafficMetrics:
    """ASGI middleware: count, time and track each HTTP request under its route's label.

    ``/metrics`` itself is not counted (as BentoML does not); a request whose app raises
    before answering counts as a 500. Non-HTTP scopes (lifespan) pass through. ``registry``:
    where the series live (None: the default; a test gives its own).
    """

    def __init__(self, app, registry=None) -> None:
        self.app, self.registry = app, registry
        self.series: _Series | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        if self.series is None:
            self.series = _Series(self.registry)
        series, labels = self.series, request_labels(route_label(scope["path"]))
        start, status = default_timer(), 0

        def count(code: int) -> None:
            series.total.labels(**labels, http_response_code=code).inc()
            elapsed = max(default_timer() - start, 0.0)
            series.duration.labels(**labels, http_response_code=code).observe(elapsed)

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count(status)
            await send(message)

        with series.in_progress.labels(**labels).track_inprogress():
            try:
                await self.app(scope, receive, counted_send)
            except Exception:
                if status == 0:  # nothing was sent: the server answers 500
                    count(500)
                raise


class _Collected:
    """Metric families collected once, as ``prometheus_client.generate_latest`` reads them."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


def exposition() -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type: every worker's series when ``bentoml
    serve`` runs them (multi-process files in ``PROMETHEUS_MULTIPROC_DIR``), else this
    process's."""
    import prometheus_client
    from prometheus_client import multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    families = list(registry.collect())
    for family in families:
        # Merged histograms list _sum and _count before the buckets; the text format wants
        # the buckets first (BentoML's own /metrics sorts them the same way).
        if family.type == "histogram":
            family.samples.sort(key=_histogram_order)
    body = prometheus_client.generate_latest(_Collected(families))
    return body, prometheus_client.CONTENT_TYPE_LATEST


def _histogram_order(sample) -> tuple:
    """Buckets (in ``le`` order), then ``_count``, then ``_sum``, per label set."""
    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
    kind = 0 if sample.name.endswith("_bucket") else 1 if sample.name.endswith("_count") else 2
    le = float(sample.labels.get("le", "inf").replace("+Inf", "inf"))
    return labels, kind, le


class Metrics:
    """The service's own Prometheus metrics on ``/metrics``: abstentions and the OOD score histogram.

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
