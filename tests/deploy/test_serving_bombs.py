"""Compressed-stream bombs against the served Bento (issue 21): each is answered 413
``too_large`` at once, from its codestream's header, and the server stays ready and small."""

from __future__ import annotations

import time

import psutil
import requests

from tests import bombs

DICOM = {"Content-Type": "application/dicom"}
PNG = {"Content-Type": "image/png"}
# The budget for the whole served tree (server, entry worker, model worker).
TREE_BUDGET_BYTES = 2 * 2**30


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_served_bombs_are_refused_at_once_and_the_server_stays_ready_and_small(served) -> None:
    cases = [
        ("/classify/dicom", DICOM, bombs.jpeg_lossless_bomb(), 413, "too_large"),
        ("/classify/dicom", DICOM, bombs.j2k_bomb(), 413, "too_large"),
        ("/classify/dicom", DICOM, bombs.jpeg_ls_bomb(), 413, "too_large"),
        # Over the served max_image_dim (1024) from its IHDR, before Pillow.
        ("/classify/png", PNG, bombs.png_ihdr_bomb(8192, 16, 6), 422, "image_too_large"),
    ]
    for route, headers, body, status, reason in cases:
        start = time.monotonic()
        reply = requests.post(f"{served.url}{route}", data=body, headers=headers, timeout=60)
        assert (reply.status_code, reply.json()["error"]) == (status, reason)
        assert time.monotonic() - start < 10  # the old decoders ran 69 to 191 s
    assert requests.get(f"{served.url}/readyz", timeout=10).status_code == 200
    good = bombs.corpus_file(bombs.JPEG_LS_SOURCE).read_bytes()
    assert (
        requests.post(f"{served.url}/classify/dicom", data=good, headers=DICOM).status_code == 200
    )
    rss = tree_rss(served.pid)
    print(f"served tree RSS after the bombs: {rss / 2**20:.0f} MiB")  # shown with pytest -s
    assert rss < TREE_BUDGET_BYTES, f"{rss / 2**20:.0f} MiB"
