"""The serving benchmark's hostile uploads: the server's peak memory after each (see
:mod:`benchmarks.serving`: a 1 MB deflate bomb, four at once, a 3 MB one and a 6 MB RLE image
of 8192 x 8192 x 3 x 16 bits)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def peak_rss(pid: int) -> int:
    """The largest peak resident size (VmHWM) among ``pid`` and its children, in bytes."""
    import psutil

    peaks = [0]
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            peaks.append(int(next(s for s in status if s.startswith("VmHWM")).split()[1]) * 1024)
    return max(peaks)


def rle_giant() -> bytes:
    """8192 x 8192 x 3 samples of 16 bits, zeros, RLE Lossless: about 6 MB."""
    import numpy as np
    from pydicom.uid import RLELossless

    from tests.conftest import make_mono_dataset
    from tests.deploy.samples import dataset_bytes

    # In the training data's scope (CR, CHEST), so that the size limit is what refuses it.
    ds = make_mono_dataset(np.zeros((8, 8), dtype=np.uint16), BodyPartExamined="CHEST")
    pixels = np.zeros((8192, 8192, 3), dtype=np.uint16)
    ds.set_pixel_data(pixels, photometric_interpretation="RGB", bits_stored=16)
    ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    return dataset_bytes(ds)


def bomb_cases(url: str, pid: int) -> list[dict]:
    """Peak server memory after each hostile upload (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from tests.deploy.samples import deflate_bomb

    one = deflate_bomb(2**30)
    cases = {
        "deflate bomb, 1 MB -> 1 GiB": [one],
        "4 deflate bombs at once": [one] * 4,
        "deflate bomb, 3 MB -> 3 GiB": [deflate_bomb(3 * 2**30)],
        "RLE 8192 x 8192 x 3 x 16 bit": [rle_giant()],
    }
    out = [{"case": "(before)", "size_mb": 0.0, "statuses": "", "peak_mib": peak_rss(pid) / 2**20}]

    def post(data: bytes) -> int:
        headers = {"Content-Type": "application/dicom"}
        return requests.post(
            f"{url}/classify/dicom", data=data, headers=headers, timeout=300
        ).status_code

    for name, bodies in cases.items():
        with ThreadPoolExecutor(len(bodies)) as pool:
            statuses = list(pool.map(post, bodies))
        out.append(
            {
                "case": name,
                "size_mb": len(bodies[0]) / 1e6,
                "statuses": ", ".join(map(str, statuses)),
                "peak_mib": peak_rss(pid) / 2**20,
            }
        )
        print(out[-1], flush=True)
    return out


def bomb_table(bombs: list[dict]) -> list[str]:
    """The markdown table of :func:`bomb_cases`' rows."""
    return [
        "| case | upload MB | statuses | peak RSS MiB |",
        "| --- | --- | --- | --- |",
        *(
            f"| {b['case']} | {b['size_mb']:.1f} | {b['statuses']} | {b['peak_mib']:.0f} |"
            for b in bombs
        ),
    ]
