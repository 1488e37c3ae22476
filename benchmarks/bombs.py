"""Decompression bombs and large legal images: peak memory and answer of the decoding path.

Each case of issue 21 is decoded the way the service's entry worker decodes an upload
(:func:`tasks.model.inference.prepare_dicom` / :func:`prepare_png` to the model's 128 px input),
in a fresh process, measuring that process's peak RSS (``ru_maxrss``) and the answer:

- **guarded**: the code as it is (codestream size read before decoding, decoded budget
  ``serving.max_decoded_mib`` of params.yaml);
- **old**: the same call with the new guards out of the way (no codestream check, no decoded
  budget; the header bound of ``max_image_dim`` kept), i.e. the path the issue measured.
  The old path is not run on the three codestream bombs (65000² would take 4 to 16 GB and
  minutes on a shared machine): their row gives the issue's own figures, marked as such.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bombs.py`` (about a minute; needs pydicom-data).
Writes ``benchmarks/results/bombs.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import machine_header, write_result
from tasks.config import load_params

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128

# (case, builder in tests/bombs.py and its arguments, route, issue's figure for the old path
# when it is not run here)
CASES = [
    (
        "JPEG-Lossless SOF 65000² (header 768×1024)",
        "jpeg_lossless_bomb",
        [],
        "dicom",
        "16.2 GB, OOM-killed after 191 s (issue 21)",
    ),
    (
        "JPEG 2000 SIZ 40000² (header 1024²)",
        "j2k_bomb",
        [],
        "dicom",
        "10.5 GB, 422 after 69 s (issue 21)",
    ),
    (
        "JPEG-LS SOF55 65000² (header 64²)",
        "jpeg_ls_bomb",
        [],
        "dicom",
        "≥ 5.9 GB, 504 after 162 s (issue 21)",
    ),
    ("PNG 8192² RGBA 16-bit", "png_of_zeros", [8192, 16, 6], "png", None),
    ("PNG 8192² RGB 8-bit", "png_of_zeros", [8192, 8, 2], "png", None),
    ("DICOM 8000² 8-bit grey, uncompressed", "large_dicom", [8000], "dicom", None),
]

MEASURE = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from tasks.data import dicom_guards
from tasks.model import inference

path, route, variant, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = Path(path).read_bytes()
if variant == "old":
    # The guards out of the way: no codestream check, no decoded-byte budget.
    dicom_guards.check_codestream = lambda *args, **kwargs: None
    budget = 2**62
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    if route == "png":
        inference.prepare_png(data, IMAGE_SIZE, max_decoded_bytes=budget)
    else:
        inference.prepare_dicom(data, IMAGE_SIZE, max_decoded_bytes=budget)
    answer = "200"
except inference.InputRejected as err:
    answer = f"{err.status} {err.reason}"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"answer": answer, "seconds": seconds, "base_mib": base / 1024,
                  "peak_mib": peak / 1024}))
""".replace("IMAGE_SIZE", str(IMAGE_SIZE))


NOTES = """Notes. The old-path column is today's decoding with the guards removed, so it carries
this branch's other memory change: before it, the 8000² DICOM peaked at 977 MiB (same script,
same machine, commit ad97248); rescaling in place and not stacking a single frame brought it
to 733 MiB for both columns. Under the guards each bomb is refused from its header in
milliseconds with the process at its imports' size; the legal 8192² PNGs are over the 128 MiB
decoded budget (512 and 192 MiB declared) and refused as well. The largest image the budget
admits (8192² 16-bit grey, 128 MiB) decodes through the same float32 steps as the 8000² case
(256 MiB per float32 copy against 244 MiB, plus 67 MiB more of stored values); with serving.max_concurrent_decodes 1 one worker
decodes one such image at a time. These are one decoding process's figures, not a served
tree's (entry worker, model worker and server process). Served: the three codestream bombs
and the PNG IHDR bomb sent to a real `bentoml serve` (tests/deploy/test_serving_bombs.py) were
each answered within seconds (413 too_large; the PNG 422 image_too_large, over that Bento's
max_image_dim 1024), /readyz stayed 200 and the whole tree held 869 MiB RSS afterwards
(2026-12-06, n = 1)."""


def build(builder: str, arguments: list, folder: Path) -> Path:
    """Write the case's upload to ``folder`` (built in a child process: the PNG builders hold
    no image, but the 8000² DICOM does) and return its path."""
    path = folder / f"{builder}_{'_'.join(map(str, arguments))}.bin"
    code = (
        "import sys; from pathlib import Path; from tests import bombs; "
        f"Path(sys.argv[1]).write_bytes(bombs.{builder}(*{arguments!r}))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True)
    return path


def measure(path: Path, route: str, variant: str, budget: int) -> dict:
    """One decode in a fresh process: answer, seconds, RSS before decoding (imports and the
    upload read) and peak RSS, in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), route, variant, str(budget)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        return {
            "answer": f"process died ({done.returncode})",
            "seconds": float("nan"),
            "base_mib": float("nan"),
            "peak_mib": float("nan"),
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    serving = load_params(REPO / "params.yaml").serving
    budget = serving.max_decoded_mib * 2**20
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case, builder, arguments, route, issue_figure in CASES:
            path = build(builder, arguments, Path(folder))
            size_kb = path.stat().st_size / 1000
            new = measure(path, route, "guarded", budget)
            old = None if issue_figure else measure(path, route, "old", budget)
            rows.append((case, size_kb, new, old, issue_figure))
            print(case, new, old or issue_figure, flush=True)
    table = [
        "| case | upload KB | guarded: answer | guarded: peak RSS MiB (before decoding) | "
        "guarded: s | old path: answer, peak RSS MiB, s |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for case, size_kb, new, old, issue_figure in rows:
        before = (
            f"{old['answer']}, {old['peak_mib']:.0f} MiB, {old['seconds']:.1f} s"
            if old
            else f"not run here; {issue_figure}"
        )
        table.append(
            f"| {case} | {size_kb:.0f} | {new['answer']} | {new['peak_mib']:.0f} "
            f"({new['base_mib']:.0f}) | {new['seconds']:.2f} | {before} |"
        )
    body = "\n".join(
        [
            machine_header(),
            "",
            f"Each upload decoded once in a fresh process, as the service's entry worker does "
            f"(to {IMAGE_SIZE} px), with serving.max_image_dim {serving.max_image_dim} and "
            f"serving.max_decoded_mib {serving.max_decoded_mib}. Peak RSS is the whole "
            "process's (`ru_maxrss`), imports included; n = 1 per cell (peak memory of one "
            "decode is deterministic to a few MiB; times are indicative only on a shared "
            "2-core machine).",
            "",
            *table,
            "",
            NOTES,
        ]
    )
    print(body)
    print(write_result("bombs", body))


if __name__ == "__main__":
    main()
