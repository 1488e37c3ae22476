"""Real servers for tests: start a command in its own process group, wait for it, stop it.

Every process a test starts goes through :func:`start_process`, which puts it in a new
session (its own process group), so :func:`stop_process` ends it and everything it spawned
(uvicorn workers, served flow runs) by that group's id, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def environment_without_prefect(prefect_home: Path) -> dict[str, str]:
    """This process's environment for a child of its own Prefect: none of our ``PREFECT_*``
    settings (the test harness's API URL and database among them), and ``PREFECT_HOME`` set to
    ``prefect_home``, where the child's Prefect keeps its profile and database."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(prefect_home)
    return env


def run_python(script: str, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter in the repository root, with ``env``; its output
    captured as text. The caller checks the exit status (to show the output when it fails)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(
    command: Sequence[str], log_file: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``command`` in a new process group, stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: stop_process kills exactly it
        )


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``process``, SIGKILL it if still alive after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    # The leader is gone; children that ignored SIGTERM must not outlive the test either.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def stop_server_tree(process: subprocess.Popen) -> None:
    """Stop a server that puts workers in process groups of their own (BentoML's arbiter).

    SIGTERM goes to the arbiter, which stops its workers in order. The workers are listed
    first (by PID, from the arbiter's children) and any that outlive the arbiter are killed one
    by one, as is the arbiter's own group.
    """
    import psutil

    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    psutil.wait_procs(workers, timeout=10)


@contextlib.contextmanager
def running(
    command: Sequence[str], log_file: Path, env: Mapping[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """``with running(...) as process:``: the process is stopped on the way out, always."""
    process = start_process(command, log_file, env, cwd)
    try:
        yield process
    finally:
        stop_process(process)


def log_tail(log_file: Path, characters: int = 4000) -> str:
    """The end of a process's log, for assertion messages."""
    try:
        return log_file.read_text(errors="replace")[-characters:]
    except FileNotFoundError:
        return "(no log)"


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    process: subprocess.Popen | None = None,
    log_file: Path | None = None,
    interval: float = 0.5,
) -> T:
    """Call ``probe`` until it returns something truthy; fail clearly after ``timeout`` s.

    Fails early, with the log's tail, when ``process`` exits in the meantime.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"{what}: the process exited with status {process.returncode}\n"
                + (log_tail(log_file) if log_file else "")
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout:.0f} s\n" + (log_tail(log_file) if log_file else "")
            )
        time.sleep(interval)


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 (a loopback URL; no proxy is consulted)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def kill_group_when(
    command: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    ready: Callable[[int], bool],
    timeout: float,
    poll_seconds: float = 0.01,
) -> bool:
    """Start ``command`` in its own process group and SIGKILL the whole group as soon as
    ``ready(pid)`` holds (so the kill reaches its worker processes too).

    Returns whether the kill landed: False when the command ended on its own first, or
    ``timeout`` seconds passed. The group is gone when this returns either way.
    """
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if ready(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                return process.returncode == -signal.SIGKILL
            time.sleep(poll_seconds)
        return False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def seconds_to_stop_tree(process: subprocess.Popen, limit: float) -> float:
    """SIGTERM ``process`` alone and return how many seconds it took until it and every process
    it had started were gone (``inf`` when some outlived ``limit``: those are then killed)."""
    import psutil

    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=limit)
    took = time.monotonic() - start
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    process.wait(timeout=10)
    return float("inf") if alive else took
