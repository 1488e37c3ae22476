"""One run at a time per project: a lock file beside the processed dataset.

Two ``medtransfer run`` in one folder used to race: the second failed with a misleading disk
error while the first trained on a dataset the second had half replaced. The lock is an
``flock`` on ``<processed_dir's folder>/.medtransfer.lock``: the kernel drops it when its
holder exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import MedtransferError

LOCK_NAME = ".medtransfer.lock"


def lock_path(processed_dir: str | Path) -> Path:
    """The lock file guarding the outputs of a project whose dataset is ``processed_dir``."""
    return Path(processed_dir).resolve().parent / LOCK_NAME


@contextmanager
def project_lock(processed_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold the project's lock for the duration of ``command``, or refuse at once.

    Args:
        processed_dir: ``data.processed_dir``; the lock lives in its parent folder.
        command: the command taking the lock (``run``, ``ingest``, ...), recorded in the
            file so that a refused second run can name the first.

    Yields:
        The lock file's path.

    Raises:
        MedtransferError: another process holds the lock; the message names its command,
            pid and start time.
    """
    path = lock_path(processed_dir)
    if _is_torchrun_worker():
        # rank 0 of the same launch holds the lock for the whole job; rank 0 alone writes
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, path)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"medtransfer {command} pid {os.getpid()} started {started}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing releases the flock


def _is_torchrun_worker() -> bool:
    """True in a ``torchrun`` process other than rank 0 (``RANK``/``WORLD_SIZE`` as torchrun
    sets them), whose launch's rank 0 takes the lock for every rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and int(os.environ.get("RANK", "0")) != 0


def _take(fd: int, path: Path) -> None:
    """Take the exclusive lock on ``fd`` without waiting, or raise naming its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(errors="replace").strip() or "another medtransfer command"
        raise MedtransferError(
            f"{holder} is still working on this project (lock {LOCK_NAME} beside "
            "data.processed_dir). Wait for it to finish, or stop it, then run again."
        ) from None
