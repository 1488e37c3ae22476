"""The one file digest: a file's SHA-256, for pinned weights, the synthetic set's labels and the
pipeline's cache keys alike; and the one way a dataset version (DVC's hash) is shown to a person."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20  # read 1 MiB at a time: a weights file need not sit in memory twice


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 (64 characters) of the bytes of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


DVC_DIR_SUFFIX = ".dir"  # DVC's marker on a folder's hash (its .dir object lists the files)


def shown_version(version: str) -> str:
    """A dataset version as a person reads it (summary, model card, log lines): DVC's hash of the
    processed folder without the ``.dir`` DVC appends to a folder's hash, e.g.
    ``"67fc...cea.dir"`` -> ``"67fc...cea"``. Reports, MLflow tags and ``dvc.lock`` keep the
    full form, which machines compare; the hex part alone still finds it there."""
    return version.removesuffix(DVC_DIR_SUFFIX)
