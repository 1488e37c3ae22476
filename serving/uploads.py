"""The upload checks in front of the classify routes, before BentoML reads a body.

:class:`UploadLimits` is ASGI middleware (``Classifier.add_asgi_middleware`` in
:mod:`serving.service`): per route it checks the Content-Type, the body's size as it arrives,
the multipart parts (how many, named what, file names BentoML can store) and replays the
checked body; a refusal is a 4xx with the service's error body (codes in
:data:`tasks.model.inference.REJECTIONS`), never the upload's content or file name.
"""

from __future__ import annotations

import logging
import os

from fastapi.responses import JSONResponse

from tasks.model.inference import InputRejected

logger = logging.getLogger("medtransfer.serving")

DICOM_TYPES = ("application/dicom", "application/octet-stream")
PNG_TYPES = ("image/png",)
MULTIPART_TYPES = ("multipart/form-data",)
# A multipart file name longer than this is refused (BentoML's temporary file keeps it as a
# suffix after an 11-character prefix, and file names end at 255 bytes).
MAX_FILE_NAME_BYTES = 200


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
