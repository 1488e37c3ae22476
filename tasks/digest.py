"""The one file digest: a file's SHA-256, for pinned weights, the synthetic set's labels and the
pipeline's cache keys alike."""

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
