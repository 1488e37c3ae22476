"""The service's request deadline and decode slots (issue 21): a request that cannot finish
within serving.request_timeout_s answers 503 with its upload removed, and no more than
serving.max_concurrent_decodes images decode at once in a worker, abandoned ones included.

The service module is imported in a child process with its Bento arguments set as BentoML's CLI
sets them (``request_timeout_s`` 0.5 s, one decode slot), no server started.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.students import REPO

PROBE = """
import json, tempfile, threading, time
from pathlib import Path
from bentoml._internal.configuration.containers import BentoMLContainer
BentoMLContainer.bento_arguments.set({"model_tag": "absent:model", "classes": ["a", "b"],
    "image_size": 32, "request_timeout_s": 0.5, "max_concurrent_decodes": 1})
import anyio
import serving.service as service

running, most = 0, 0
lock = threading.Lock()

def decode(seconds):
    global running, most
    with lock:
        running += 1
        most = max(most, running)
    time.sleep(seconds)
    with lock:
        running -= 1
    return seconds

async def request(seconds, upload):
    start = time.monotonic()
    try:
        with service.request_deadline([upload], service.ARGS.request_timeout_s):
            await service.DECODES.run(decode, seconds)
        answer = "done"
    except TimeoutError:
        answer = "timeout"
    return answer, time.monotonic() - start, upload.exists()

async def main():
    folder = Path(tempfile.mkdtemp())
    uploads = [folder / f"upload{i}" for i in range(4)]
    for upload in uploads:
        upload.write_bytes(b"x")
    out = {"slow": await request(2.0, uploads[0])}
    # The abandoned decode still holds the one slot for about 1.5 s: a quick one waits, and
    # (with 0.5 s to wait) times out too.
    out["behind_abandoned"] = await request(0.01, uploads[1])
    time.sleep(2.0)
    results = []
    async with anyio.create_task_group() as group:
        for upload in uploads[2:]:
            async def one(upload=upload):
                results.append(await request(0.2, upload))
            group.start_soon(one)
    out["two_quick"] = results
    out["most_at_once"] = most
    reply = service.timed_out("/classify/dicom")
    out["reply"] = [reply.status_code, json.loads(reply.body), reply.headers.get("retry-after")]
    print(json.dumps(out))

anyio.run(main)
"""


@pytest.fixture(scope="module")
def probed() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_request_past_its_deadline_is_cut_at_the_deadline_and_its_upload_removed(
    probed: dict,
) -> None:
    answer, seconds, upload_left = probed["slow"]
    assert answer == "timeout" and not upload_left
    assert 0.5 <= seconds < 1.5  # not the 2 s the decode takes


def test_an_abandoned_decode_keeps_its_slot_until_it_ends(probed: dict) -> None:
    answer, _seconds, upload_left = probed["behind_abandoned"]
    assert answer == "timeout" and not upload_left  # waited for the slot, not decoded
    assert probed["most_at_once"] == 1


def test_requests_within_the_deadline_take_their_turn_and_keep_their_uploads(
    probed: dict,
) -> None:
    (first, t1, left1), (second, t2, left2) = probed["two_quick"]
    assert first == second == "done" and left1 and left2
    assert max(t1, t2) >= 0.4  # one slot: the second waited for the first's 0.2 s


def test_the_timeout_reply_is_a_503_to_retry(probed: dict) -> None:
    status, body, retry_after = probed["reply"]
    assert (status, body["error"], body["status"], retry_after) == (
        503,
        "request_timeout",
        503,
        "5",
    )
