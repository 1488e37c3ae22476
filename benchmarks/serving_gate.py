"""The OOD gate's serving cost, side by side: ``python -m benchmarks.serving --gate-ab ROUNDS``
(:mod:`benchmarks.serving` builds, packages and serves; results in
``benchmarks/results/serving-gate.md``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics

from benchmarks.report import machine_header, write_result
from benchmarks.serving import (
    CONFIGS,
    bench_root,
    drive,
    make_dicoms,
    make_student,
    package,
    row_line,
    serve,
)
from benchmarks.serving_bombs import bomb_cases, bomb_table


def gate_ab(args: argparse.Namespace) -> int:
    """The OOD gate's cost measured side by side: both Bentos served at once, runs alternated
    (on, off, on, off, ...) so that the machine's other load falls on both alike."""
    with bench_root("medtransfer-serving-gate-", args.keep) as root:
        runs, bombs = _alternated_runs(args, root)
    path = write_result("serving-gate", _report(args, runs, bombs))
    print(f"written to {path}")
    return 0


def _alternated_runs(args: argparse.Namespace, root) -> tuple[dict[str, list[dict]], list[dict]]:
    """``args.gate_ab`` runs per configuration at the largest client count, alternated, and the
    bomb cases against the gate-on server."""
    clients = max(args.clients)
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
                print(config, row_line({**runs[config][-1], "config": config, "batching": "on"}))
        return runs, bomb_cases(*served["gate on"])


def _report(args: argparse.Namespace, runs: dict[str, list[dict]], bombs: list[dict]) -> str:
    """The results file's body: medians per configuration, per-round ratios, bombs."""
    median = {
        c: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        for c, rs in runs.items()
    }
    ratios = [
        on["rps"] / off["rps"] for on, off in zip(runs["gate on"], runs["gate off"], strict=True)
    ]
    return "\n".join(
        [
            machine_header(),
            "",
            f"Gate on vs off, served side by side, batching on, {max(args.clients)} clients, "
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
            *bomb_table(bombs),
        ]
    )
