"""The cost of DICOM output per request: requests/s with and without the SR and Grad-CAM SC.

Builds, registers and packages the serving benchmark's student (:mod:`benchmarks.serving`:
EfficientNet-Lite0 ``partial``, 128 px, params.yaml's serving settings) and serves the one Bento
twice: plainly, and with ``MEDTRANSFER_PACS`` pointing at a real Orthanc started on loopback
(Debian's package, ``make orthanc``). 8 clients then send files of the student's own synthetic
training set (in distribution, so that replies are not abstentions, which get no SC) to
``/classify/dicom``, each client one request after the other, in alternated rounds of
``--seconds`` (so that the machine's other load falls on every mode alike):

- ``json``: the plain reply (no Grad-CAM, no DICOM);
- ``dicom``: ``Accept: application/dicom`` on the plain server (Grad-CAM, SR and SC built and
  returned as multipart/related);
- ``json + PACS``: the plain reply from the PACS server, which builds the SR and SC and
  C-STOREs them to Orthanc before answering.

Prints and writes to ``benchmarks/results/dicom-output.md`` the median requests/s, p50 and p99
over the rounds, n requests, and the per-round ratio to ``json``; where the time goes, measured
in process (the student's forward pass and its Grad-CAM, one torch thread; building and
encoding the SR and the SC); then one SR's content tree.

Usage: ``python -m benchmarks.dicom_output [--seconds 10] [--rounds 3] [--clients 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result
from benchmarks.serving import N_FILES, make_student, package, serve
from tests.deploy.orthanc import start_orthanc

MODES = {
    "json": ("plain", {}),
    "dicom": ("plain", {"Accept": "application/dicom"}),
    "json + PACS": ("pacs", {}),
}


async def drive(url: str, files: list[bytes], clients: int, seconds: float, accept: dict) -> dict:
    """``clients`` concurrent clients, one request after the other each, for ``seconds``;
    requests/s, p50 and p99 latency of the 200s, and the error count."""
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    headers = {"Content-Type": "application/dicom", **accept}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one_client(index: int) -> None:
            nonlocal errors
            sent = 0
            while time.perf_counter() < stop:
                data = files[(index + sent * clients) % len(files)]
                start = time.perf_counter()
                try:
                    reply = await client.post("/classify/dicom", content=data, headers=headers)
                    ok = reply.status_code == 200 and reply.headers.get("medtransfer-pacs") in (
                        None,
                        "off",
                        "stored",
                    )
                    ok = ok and (accept or "error" not in reply.json().get("pacs", {}))
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                sent += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
    }


def content_tree(sr) -> str:
    """An SR's content tree, one item a line: relationship, value type, concept, value."""
    lines = [f"CONTAINER {sr.ConceptNameCodeSequence[0].CodeMeaning}"]

    def walk(items, depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0]
            value = {
                "CODE": lambda i: _coded(i.ConceptCodeSequence[0]),
                "NUM": lambda i: (
                    f"{float(i.MeasuredValueSequence[0].FloatingPointValue):.6g}"
                    f" [{i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}]"
                ),
                "TEXT": lambda i: repr(str(i.TextValue)),
                "IMAGE": lambda i: (
                    "SOP instance " + i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                ),
                "CONTAINER": lambda i: "",
            }[item.ValueType](item)
            lines.append(
                f"{'  ' * depth}{item.RelationshipType} {item.ValueType} {_coded(name)}"
                + (f" = {value}" if value else "")
            )
            walk(item.get("ContentSequence", []), depth + 1)

    walk(sr.ContentSequence, 1)
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _coded(code) -> str:
    value = code.get("CodeValue") or code.get("LongCodeValue")
    return f"({value}, {code.CodingSchemeDesignator}, {code.CodeMeaning!r})"


def one_sr(url: str, data: bytes):
    """The SR the plain server answers for ``data`` with ``Accept: application/dicom``."""
    import email

    import requests
    from pydicom import dcmread

    reply = requests.post(
        f"{url}/classify/dicom",
        data=data,
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom"},
        timeout=120,
    )
    reply.raise_for_status()
    head = f"Content-Type: {reply.headers['content-type']}\r\n\r\n".encode()
    parts = email.message_from_bytes(head + reply.content).get_payload()
    return dcmread(io.BytesIO(parts[0].get_payload(decode=True)))


def breakdown(files: list[bytes]) -> list[str]:
    """Table rows: milliseconds per call, in process, median of 5, of the student's forward
    pass and its Grad-CAM (batches of 1 and 8, one torch thread) and of building and encoding
    the SR and the SC of one file."""
    import numpy as np
    import pydicom
    import torch

    from serving.dicom_capture import secondary_capture
    from serving.dicom_output import encoded
    from serving.dicom_report import structured_report
    from tasks.model.explain import Explainer
    from tasks.model.predict import to_model_input
    from tasks.model.profile import features_and_probabilities
    from tasks.model.student import build_student

    torch.set_num_threads(1)
    model = build_student("efficientnet-lite0", "partial", num_classes=2, unfreeze_blocks=3)
    explainer = Explainer(model.eval())
    source = pydicom.dcmread(io.BytesIO(files[0]))
    image = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    cam = np.random.default_rng(1).random((128, 128))
    reply = {"label": "opacity", "probabilities": {"normal": 0.4, "opacity": 0.6}}
    reply |= {"abstained": False, "ood": {"score": 0.1, "threshold": 0.2}, "threshold": 0.5}
    reply["model"] = {"name": "m", "version": "1", "dataset_version": "d", "bento_model": "m:1"}
    batch = {b: np.repeat(image[None], b, axis=0) for b in (1, 8)}
    calls = {
        **{
            f"forward, batch {b}": lambda b=b: features_and_probabilities(model, batch[b], 1.0)
            for b in (1, 8)
        },
        **{
            f"Grad-CAM, batch {b}": lambda b=b: explainer.maps(
                to_model_input(batch[b]), np.zeros(b, dtype=int)
            )
            for b in (1, 8)
        },
        "SR: build and encode": lambda: encoded(structured_report(source, reply)),
        "SC: build and encode": lambda: encoded(secondary_capture(source, image, cam)),
    }
    rows = []
    for name, call in calls.items():
        call()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - start))
        rows.append(f"| {name} | {statistics.median(times):.0f} |")
    return rows


def training_files(params: dict) -> list[bytes]:
    """:data:`N_FILES` DICOM files of the student's own training set (in distribution)."""
    found = sorted(Path(params["data"]["source"]).rglob("*.dcm"))[:N_FILES]
    return [path.read_bytes() for path in found]


def abstentions(url: str, files: list[bytes]) -> int:
    """How many of ``files`` the served model abstains on."""
    import requests

    headers = {"Content-Type": "application/dicom"}
    replies = [requests.post(f"{url}/classify/dicom", data=d, headers=headers) for d in files]
    return sum(bool(r.json()["abstained"]) for r in replies)


def run(args: argparse.Namespace, root: Path) -> tuple[dict, str, int, list[str]]:
    """Package, serve plainly and with the PACS, alternate the modes' rounds; the rounds per
    mode, one SR's content tree, the number of files abstained on and, once the servers are
    stopped, :func:`breakdown`'s rows."""
    params = make_student(root)
    files = training_files(params)
    bento = package(params, root, True, [])["bento"]
    orthanc = start_orthanc(Path(tempfile.mkdtemp(dir=root)))
    try:
        with contextlib.ExitStack() as stack:
            plain = stack.enter_context(serve(bento, root / "plain.log"))[0]
            os.environ["MEDTRANSFER_PACS"] = orthanc.address
            try:
                pacs = stack.enter_context(serve(bento, root / "pacs.log"))[0]
            finally:
                del os.environ["MEDTRANSFER_PACS"]
            urls = {"plain": plain, "pacs": pacs}
            abstained = abstentions(plain, files)
            for server, accept in MODES.values():  # warm-up, batcher calibration
                asyncio.run(drive(urls[server], files, 1, 3.0, accept))
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):
                for mode, (server, accept) in MODES.items():
                    row = asyncio.run(
                        drive(urls[server], files, args.clients, args.seconds, accept)
                    )
                    runs[mode].append(row)
                    print(f"round {round_ + 1} {mode}: {row}", flush=True)
            tree = content_tree(one_sr(plain, files[0]))
    finally:
        orthanc.stop()
    return runs, tree, abstained, breakdown(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="medtransfer-dicom-output-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    try:
        runs, tree, abstained, costs = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = runs["json"]
    lines = [
        machine_header(),
        "",
        f"{args.clients} clients, {N_FILES} DICOM files of the student's own synthetic "
        "training set (256x256, params.yaml's synthetic defaults) to `/classify/dicom`, "
        f"{args.rounds} alternated rounds of {args.seconds:g} s per mode (client, both servers "
        "and Orthanc on the same machine, which was shared with other work). Student: "
        "efficientnet-lite0 `partial`, 128 px, params.yaml's serving settings. Medians over "
        "the rounds; n: requests answered 200 in all rounds; errors: anything else. "
        f"highdicom {_version('highdicom')}, pynetdicom {_version('pynetdicom')}, Orthanc "
        "from Debian's package. "
        f"The model abstained on {abstained} of the {N_FILES} files (an "
        "abstention gets the SR alone).",
        "",
        "| mode | requests/s (median) | per round | p50 ms | p99 ms | n | errors | "
        "ratio to json (median of rounds) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, rows in runs.items():
        per_round = ", ".join(f"{r['rps']:.1f}" for r in rows)
        ratios = [r["rps"] / b["rps"] for r, b in zip(rows, base, strict=True)]
        lines.append(
            f"| {mode} | {statistics.median(r['rps'] for r in rows):.1f} "
            f"| {per_round} "
            f"| {statistics.median(r['p50_ms'] for r in rows):.0f} "
            f"| {statistics.median(r['p99_ms'] for r in rows):.0f} "
            f"| {sum(r['requests'] for r in rows)} | {sum(r['errors'] for r in rows)} "
            f"| {statistics.median(ratios):.2f} |"
        )
    lines += [
        "",
        "Where the time goes, in process (ms per call, median of 5; one torch thread, 128 px; "
        "the entry worker builds the SR and SC, the model worker runs the forward pass and, "
        "for DICOM output, Grad-CAM too):",
        "",
        "| step | ms |",
        "| --- | --- |",
        *costs,
        "",
        "One SR's content tree (the first file, `dicom` mode):",
        "",
        "```",
        tree,
        "```",
    ]
    path = write_result("dicom-output", "\n".join(lines))
    print("\n".join(lines[2:]))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
