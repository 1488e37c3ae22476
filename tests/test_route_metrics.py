"""The service's request metrics are labelled by route: scanning URLs adds no series, and each
request is counted once with its status (serving.metrics; the served check is in
tests/deploy/test_serving_ops.py)."""

from __future__ import annotations

import asyncio

import httpx
import prometheus_client
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serving.metrics import UNKNOWN_ROUTE, RouteTrafficMetrics, request_labels, route_label


def _broken(request):
    raise RuntimeError("the handler failed")


APP = Starlette(
    routes=[
        Route("/info", lambda request: PlainTextResponse("ok")),
        Route("/classify/png", _broken, methods=["POST"]),
    ]
)


async def _raises_before_answering(scope, receive, send) -> None:
    raise RuntimeError("no response was started")


def _statuses(registry, requests: list[tuple[str, str]], app=APP) -> list[int]:
    """The status of each ``(method, path)`` sent in turn through the middleware to ``app``."""

    async def send_all() -> list[int]:
        app_ = RouteTrafficMetrics(app, registry=registry)
        transport = httpx.ASGITransport(app=app_, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.request(m, path)).status_code for m, path in requests]

    return asyncio.run(send_all())


def _count(registry, endpoint: str, code: int, name: str = "request_total") -> float:
    labels = {**request_labels(endpoint), "http_response_code": str(code)}
    value = registry.get_sample_value(f"bentoml_service_{name}", labels)
    return 0.0 if value is None else value


def test_three_hundred_unknown_paths_are_one_series_counted_three_hundred_times() -> None:
    registry = prometheus_client.CollectorRegistry()
    statuses = _statuses(registry, [("GET", f"/scan-{i}/Doe^Jane") for i in range(300)])
    assert statuses == [404] * 300
    assert _count(registry, UNKNOWN_ROUTE, 404) == 300
    series = {
        sample.labels["endpoint"]
        for family in registry.collect()
        for sample in family.samples
        if "endpoint" in sample.labels
    }
    assert series == {UNKNOWN_ROUTE, "/classify/dicom", "/classify/png", "/classify/batch"}


def test_a_known_route_is_counted_by_name_and_a_failing_handler_as_a_500() -> None:
    registry = prometheus_client.CollectorRegistry()
    sent = [("GET", "/info"), ("POST", "/classify/png"), ("GET", "/metrics")]
    assert _statuses(registry, sent) == [200, 500, 404]  # /metrics: not a route of this app
    assert _count(registry, "/info", 200) == 1
    assert _count(registry, "/classify/png", 500) == 1
    assert _count(registry, "/metrics", 404) == 0  # /metrics is never counted
    assert _count(registry, "/info", 200, "request_duration_seconds_count") == 1


def test_an_app_that_raises_before_answering_is_counted_as_a_500() -> None:
    registry = prometheus_client.CollectorRegistry()
    assert _statuses(registry, [("GET", "/info")], app=_raises_before_answering) == [500]
    assert _count(registry, "/info", 500) == 1


@pytest.mark.parametrize(
    ("path", "label"),
    [("/classify/dicom", "/classify/dicom"), ("/static_content/a.js", "/static_content/{path}"),
     ("/classify/dicom/x", UNKNOWN_ROUTE), ("/", "/")],
)  # fmt: skip
def test_route_label_names_known_routes_and_templates_and_nothing_else(path, label) -> None:
    assert route_label(path) == label
