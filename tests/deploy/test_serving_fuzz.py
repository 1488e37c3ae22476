"""Property-based fuzzing of the served Bento: whatever the body, content type or bytes, the
answer is never a 5xx, and every 4xx carries the documented error body."""

from __future__ import annotations

import functools

import numpy as np
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.model.inference import REJECTIONS
from tests.deploy.samples import corpus_bytes, identified_dicom, png_bytes

ROUTES = ("/classify/dicom", "/classify/png", "/classify/batch")
EXAMPLES_PER_ROUTE = 180  # three routes: 540 requests in all
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # no example database written into the checkout
)


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """Valid uploads to mutate: DICOM in several syntaxes, a multi-frame file, PNGs."""
    rng = np.random.default_rng(0)
    return (
        corpus_bytes("CT_small.dcm"),
        corpus_bytes("MR_small_RLE.dcm"),
        corpus_bytes("JPEG2000.dcm"),
        corpus_bytes("emri_small.dcm"),
        identified_dicom(),
        png_bytes(rng.integers(0, 256, (40, 30), dtype=np.uint8)),
        png_bytes(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
    )


def _often(draw) -> bool:
    """True most of the time (Hypothesis favours small integers, so this is well over 3/4)."""
    return draw(st.integers(0, 99)) < 75


@st.composite
def mutated(draw) -> bytes:
    """A valid upload with bytes overwritten, cut short, or padded."""
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.sampled_from([0, 1, 3, 12]))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.sampled_from([False, True])):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.sampled_from([False, False, True])):
        data += draw(st.binary(max_size=64))
    return bytes(data)


# Mostly mutated valid uploads, which reach the decoders and the model, plus raw bytes.
bodies = st.one_of(mutated(), mutated(), mutated(), st.binary(max_size=2048))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(
    str.strip
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/dicom",
            "application/octet-stream",
            "image/png",
            "multipart/form-data",
            "multipart/form-data; boundary=fuzzb",
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
        ]
    ),
    header_text,
    st.none(),
)


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    """A multipart body, well formed or not, with fuzzed parts; returns (body, content type).

    Choices are drawn with ``sampled_from`` listing the well-formed option first and most
    often, so that many batches reach the decoders and the model.
    """
    boundary = draw(st.sampled_from(["fuzzb", "x", "----a1b2c3"]))
    chunks = []
    for _ in range(draw(st.integers(1, 3)) if _often(draw) else draw(st.sampled_from([0, 5, 6]))):
        name = "files" if _often(draw) else draw(st.sampled_from(["file", "other", ""]))
        disposition = f'form-data; name="{name}"'
        if _often(draw):
            disposition += '; filename="upload.dcm"'
        if not _often(draw):
            disposition = ""
        headers = f"Content-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            headers += f"Content-Type: {draw(header_text)}\r\n"
        chunks.append(f"--{boundary}\r\n{headers}\r\n".encode() + draw(bodies) + b"\r\n")
    body = b"".join(chunks)
    if _often(draw):
        body += f"--{boundary}--\r\n".encode()
    if not _often(draw):
        body = body[: draw(st.integers(0, len(body)))]
    declared = boundary if _often(draw) else draw(st.sampled_from(["other", ""]))
    content_type = "multipart/form-data" + (f"; boundary={declared}" if declared else "")
    return body, content_type


def _check(reply: requests.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code >= 400:
        body = reply.json()
        assert body["error"] in REJECTIONS and body["status"] == reply.status_code
    else:
        assert reply.status_code == 200 and set(reply.json()) >= {"threshold", "model"}


def _post(url: str, body: bytes, content_type: str | None) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return requests.post(url, data=body, headers=headers, timeout=60)


def _mostly(valid: str):
    """The route's own content type most of the time, anything else otherwise."""
    return st.tuples(st.integers(0, 99), content_types).map(
        lambda pair: valid if pair[0] < 75 else pair[1]
    )


@FUZZ
@given(body=bodies, content_type=_mostly("application/dicom"))
def test_fuzzed_dicom_uploads_never_get_a_5xx(
    served, body: bytes, content_type: str | None
) -> None:
    _check(_post(f"{served.url}/classify/dicom", body, content_type))


@FUZZ
@given(body=bodies, content_type=_mostly("image/png"))
def test_fuzzed_png_uploads_never_get_a_5xx(served, body: bytes, content_type: str | None) -> None:
    _check(_post(f"{served.url}/classify/png", body, content_type))


@FUZZ
@given(
    request=st.one_of(
        multipart_bodies(), multipart_bodies(), multipart_bodies(), st.tuples(bodies, content_types)
    )
)
def test_fuzzed_batches_never_get_a_5xx(served, request: tuple[bytes, str | None]) -> None:
    body, content_type = request
    _check(_post(f"{served.url}/classify/batch", body, content_type))
