"""Serving operations: the README's relative ``BENTOML_HOME`` serves, ``/readyz`` follows the
model worker, SIGTERM stops the whole process tree, and a client's file name neither fails a
request nor reaches the log; over HTTP, a request past serving.request_timeout_s is 503 with
Retry-After and its upload removed. Each server here runs on a copy of the session's BentoML
home (a second server on the same home would clear the first one's Prometheus folder); the
deadline and arbiter-kill tests share one (the kill test, last, ends it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tests.deploy.conftest import BIN
from tests.deploy.samples import corpus_bytes, png_bytes
from tests.deploy.students import REPO
from tests.processes import free_port, seconds_to_stop_tree, stop_server_tree, wait_until

SERVE_LINE = re.compile(r"^BENTOML_HOME=(\S+) \.venv/bin/bentoml serve (\S+) --port 3000$", re.M)
DICOM = {"Content-Type": "application/dicom"}
# SIGTERM must stop the arbiter and its workers within this (measured: 0.7-2 s serving, 2-11 s
# in a model worker's crash loop, on a busy 2-core machine).
STOP_SECONDS = 15
NAME_MARKER = "ZQXFILENAME"
GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # a 256² grey PNG's pixels


def _serve(
    home: str, bento: str, cwd: Path, extra_env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    log = (cwd / "server.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
        env={**env, **extra_env, "BENTOML_HOME": home},
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return process, f"http://127.0.0.1:{port}"


def _status(url: str, timeout: float) -> int | None:
    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        return None


@pytest.mark.slow
def test_the_readmes_relative_bentoml_home_serves_and_sigterm_stops_the_tree(
    served, tmp_path: Path
) -> None:
    (match,) = SERVE_LINE.findall((REPO / "README.md").read_text())
    home, bento = match
    assert not os.path.isabs(home)
    shutil.copytree(served.home, tmp_path / home)
    store = {"MEDTRANSFER_MONITOR_STORE": str(tmp_path / "requests.sqlite")}
    process, url = _serve(home, bento, tmp_path, store)
    log = tmp_path / "server.log"
    try:
        probe = lambda: _status(f"{url}/readyz", 5) == 200  # noqa: E731
        wait_until(probe, 240, "ready with a relative BENTOML_HOME", process, log)
        reply = requests.post(
            f"{url}/classify/dicom", data=corpus_bytes("MR_small.dcm"), headers=DICOM, timeout=60
        )
        assert reply.status_code == 200, reply.text
        took = seconds_to_stop_tree(process, STOP_SECONDS)
        assert took < STOP_SECONDS, log.read_text()[-3000:]
    finally:
        stop_server_tree(process)
    assert "FileNotFoundError" not in log.read_text()


@dataclass
class ShortDeadline:
    """A second server of the session's Bento, its request_timeout_s set to 1 ms, with its own
    BentoML home and temporary folder (where BentoML keeps each request's upload)."""

    process: subprocess.Popen
    url: str
    log: Path
    temp: Path


# The short deadline's server: no request can finish within it (reading and decoding the upload
# alone takes longer), and its readiness probe does not depend on it.
SHORT_DEADLINE_S = 0.001


@pytest.fixture(scope="module")
def short_deadline(served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortDeadline]:
    """The session's Bento served again with ``request_timeout_s`` of :data:`SHORT_DEADLINE_S`
    (set in a copy of its home's ``bento.yaml``, where the package stage writes serving.*).
    Shared by the deadline test and, last, the arbiter-kill test, which kills it: one server
    start for both."""
    root = tmp_path_factory.mktemp("short-deadline")
    home = root / "home"
    shutil.copytree(served.home, home)
    (bento_yaml,) = home.glob("bentos/*/*/bento.yaml")
    bento = yaml.safe_load(bento_yaml.read_text())
    bento["args"]["request_timeout_s"] = SHORT_DEADLINE_S
    bento_yaml.write_text(yaml.safe_dump(bento, sort_keys=False))
    temp = root / "tmp"
    temp.mkdir()
    env = {"MEDTRANSFER_MONITOR_STORE": str(root / "requests.sqlite"), "TMPDIR": str(temp)}
    process, url = _serve(str(home), served.package["bento"], root, env)
    log = root / "server.log"
    try:
        probe = lambda: _status(f"{url}/readyz", 5) == 200  # noqa: E731
        wait_until(probe, 240, "ready", process, log)
        yield ShortDeadline(process, url, log, temp)
    finally:
        stop_server_tree(process)


def _uploads_left(temp: Path) -> list[Path]:
    """Files in BentoML's per-request temporary folders (an upload not yet removed)."""
    return [path for path in temp.glob("bentoml-request-*/**/*") if path.is_file()]


def test_a_request_past_its_deadline_gets_503_to_retry_and_its_upload_is_removed(
    short_deadline: ShortDeadline,
) -> None:
    assert _uploads_left(short_deadline.temp) == []  # nothing sent yet
    for route, body, headers in [
        ("/classify/dicom", corpus_bytes("CT_small.dcm"), DICOM),
        ("/classify/png", png_bytes(GRADIENT), {"Content-Type": "image/png"}),
    ]:
        reply = requests.post(
            f"{short_deadline.url}{route}", data=body, headers=headers, timeout=60
        )
        assert reply.status_code == 503, (route, reply.text)
        assert reply.headers["Retry-After"] == "5"
        assert (reply.json()["error"], reply.json()["status"]) == ("request_timeout", 503)
        assert _uploads_left(short_deadline.temp) == [], route
    files = [("files", ("a.dcm", corpus_bytes("CT_small.dcm"), "application/dicom"))] * 2
    reply = requests.post(f"{short_deadline.url}/classify/batch", files=files, timeout=60)
    assert (reply.status_code, reply.json()["error"]) == (503, "request_timeout"), reply.text
    assert _uploads_left(short_deadline.temp) == []
    # Within the deadline nothing else is refused: the server answers its probes.
    assert _status(f"{short_deadline.url}/readyz", 10) == 200


@pytest.mark.slow
def test_the_workers_stop_when_the_arbiter_is_killed(short_deadline: ShortDeadline) -> None:
    """Kills ``short_deadline``'s server: its last user in this module."""
    import psutil

    process = short_deadline.process
    workers: list[psutil.Process] = []
    try:
        wait_until(
            lambda: _status(f"{short_deadline.url}/readyz", 5) == 200,
            240,
            "ready",
            process,
            short_deadline.log,
        )
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) == 2  # the entry worker and the model worker
        process.kill()  # the arbiter alone, as an OOM killer or `kill -9 <pid>` would
        process.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=STOP_SECONDS)
        assert not alive, [w.pid for w in alive]
    finally:
        stop_server_tree(process)
        for worker in workers:  # orphans, when the test failed
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@pytest.mark.slow
def test_readyz_is_503_while_the_model_worker_cannot_load_and_sigterm_stops_its_crash_loop(
    served, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(served.home, home)
    (weights,) = home.glob("models/*/*/model.pt")
    weights.write_bytes(b"not a model")  # the model worker fails in __init__, again and again
    store = {"MEDTRANSFER_MONITOR_STORE": str(tmp_path / "requests.sqlite")}
    process, url = _serve(str(home), served.package["bento"], tmp_path, store)
    log = tmp_path / "server.log"
    try:
        wait_until(lambda: _status(f"{url}/healthz", 5) == 200, 240, "live", process, log)
        answers = []
        for _ in range(5):  # over several of the model worker's restarts
            start = time.monotonic()
            answers.append((_status(f"{url}/readyz", 10), time.monotonic() - start < 5))
            time.sleep(1)
        assert answers == [(503, True)] * 5, answers  # not ready, and said at once (no hang)
        took = seconds_to_stop_tree(process, STOP_SECONDS)
        assert took < STOP_SECONDS, log.read_text()[-3000:]
    finally:
        stop_server_tree(process)


@pytest.mark.parametrize("length", [300, 4000])
def test_a_long_multipart_file_name_is_400_and_never_logged(served, length: int) -> None:
    name = (NAME_MARKER * (length // len(NAME_MARKER) + 1))[: length - 4] + ".dcm"
    files = [("files", (name, corpus_bytes("MR_small.dcm"), "application/dicom"))]
    reply = requests.post(f"{served.url}/classify/batch", files=files, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "bad_multipart"
    assert "under 200 bytes" in reply.json()["message"]
    assert NAME_MARKER not in reply.text and NAME_MARKER not in served.log_text()


def test_a_file_name_just_under_the_limit_is_classified_and_not_logged(served) -> None:
    name = (NAME_MARKER * 20)[:196] + ".dcm"  # 200 bytes
    files = [("files", (name, corpus_bytes("MR_small.dcm"), "application/dicom"))]
    reply = requests.post(f"{served.url}/classify/batch", files=files, timeout=60)
    assert reply.status_code == 200, reply.text
    assert NAME_MARKER not in reply.text and NAME_MARKER not in served.log_text()


def _metric_lines(url: str) -> list[str]:
    text = requests.get(f"{url}/metrics", timeout=60).text
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_metrics_label_unknown_paths_as_one_route_and_stay_flat(served) -> None:
    requests.get(f"{served.url}/scan-0", timeout=10)  # the unknown route's series exist now
    before = _metric_lines(served.url)
    for i in range(1, 301):
        assert requests.get(f"{served.url}/scan-{i}/{NAME_MARKER}", timeout=10).status_code == 404
    after = _metric_lines(served.url)
    assert len(after) == len(before)  # 300 new paths, not one new series
    unknown = [line for line in after if 'endpoint="/__unknown__"' in line and "_total{" in line]
    assert unknown, [line for line in after if "request_total" in line][:20]  # what there was
    assert not any("scan-" in line for line in after)
    assert any('endpoint="/classify/dicom"' in line for line in after)
