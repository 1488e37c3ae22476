"""The one file digest (tasks.digest.file_sha256): known values, across chunk boundaries."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.digest import CHUNK_BYTES, file_sha256


def test_the_digest_of_abc_is_the_published_sha256(tmp_path: Path) -> None:
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")  # FIPS 180-2's first example
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(str(path)) == file_sha256(path)


def test_a_file_over_several_chunks_hashes_as_its_whole_bytes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)  # two chunks and a bit
    path = tmp_path / "big.bin"
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()
    path.write_bytes(payload[:-1])
    assert file_sha256(path) != hashlib.sha256(payload).hexdigest()
