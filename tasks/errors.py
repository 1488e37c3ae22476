"""The exception types a user is meant to read, and how an I/O failure becomes one line."""

from __future__ import annotations

import errno


class MedtransferError(Exception):
    """A problem with the user's input or configuration.

    The message says what was wrong and what to do about it; the CLI prints it without a
    traceback and exits non-zero. Anything else that escapes is a bug.
    """


class StageIOError(MedtransferError):
    """A stage's I/O failed for good (after any retries): one line naming the stage, the path
    and what to do. An I/O fault is the machine's state, not a bug, so it gets no traceback."""


# OSErrors that describe the storage as it is, not a hiccup: a retry two seconds later meets
# the same file in place of a folder, the same read-only mount, the same full disk, and a
# retried train stage trains again from its last checkpoint for nothing.
PERSISTENT_ERRNOS: dict[int, str] = {
    errno.ENOTDIR: "a file stands where a folder is expected: move it away",
    errno.EEXIST: "a file stands where a folder is expected: move it away",
    errno.EISDIR: "a folder stands where a file is expected: move it away",
    errno.EACCES: "make it writable for this user",
    errno.EPERM: "make it writable for this user",
    errno.EROFS: "it is on a read-only file system: point the path at a writable one",
    errno.ENOSPC: "the disk is full: free space on it",
    errno.EDQUOT: "the disk quota is used up: free space or raise the quota",
    errno.EFBIG: "a file hit the file-size limit (ulimit -f): raise the limit",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter folder",
    errno.ELOOP: "the path loops through symbolic links: fix the links",
}


def stage_io_error(stage: str, error: OSError, retries: int = 0) -> StageIOError:
    """``error`` from ``stage`` as one line: the stage, the path, the cause and what to do.

    ``retries``: how often the flow already retried it (0 for a single stage command).
    """
    paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name)
    where = f" at {paths}" if paths else ""
    cause = error.strerror or str(error) or type(error).__name__
    tried = f"it kept failing after {retries} retries" if retries else "it failed"
    advice = PERSISTENT_ERRNOS.get(error.errno, f"{tried}: check that disk or share")
    return StageIOError(
        f"stage {stage} failed to read or write{where}: {cause} ({advice}). Then run again: "
        "the stages that finished are cache hits."
    )
