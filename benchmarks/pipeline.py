"""`make demo`'s flow, cold and warm, on the synthetic default.

Copies the project's configuration into a fresh working folder (no data, no models, no MLflow
store, no Prefect cache entries for it), runs ``medtransfer run`` there twice and times both:
the cold run does every stage; the warm run should be all cache hits. Each run is a separate
process, as a user would start it. Prints the table and writes
``benchmarks/results/pipeline.md``.

Usage: ``python -m benchmarks.pipeline [--workdir /tmp/medtransfer-pipeline-bench]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent


def run_flow(workdir: Path) -> tuple[float, dict]:
    """Run ``medtransfer run`` in ``workdir``; returns (seconds, the flow's summary)."""
    medtransfer = Path(sys.executable).parent / "medtransfer"
    start = time.perf_counter()
    done = subprocess.run(
        [str(medtransfer), "run", "-q"], cwd=workdir, capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-pipeline-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", args.workdir)

    cold, first = run_flow(args.workdir)
    print(f"cold: {cold:.1f} s", flush=True)
    warm, second = run_flow(args.workdir)
    print(f"warm: {warm:.1f} s, cached stages: {second['cached']}", flush=True)

    table = "\n".join(
        [
            "| run | seconds | stages recomputed | cache hits |",
            "| --- | ---: | --- | --- |",
            f"| cold | {cold:.1f} | {', '.join(s for s in first if s not in ('cached',) and s not in first['cached'])} | {', '.join(first['cached']) or 'none'} |",
            f"| warm | {warm:.1f} | {', '.join(s for s in second if s not in ('cached',) and s not in second['cached']) or 'none'} | {', '.join(second['cached'])} |",
            "",
            "Targets on a 2-core CPU: cold <= 300 s after install, warm <= 30 s.",
            f"Student test AUC {first['evaluate']['test']['auc']:.3f}; robustness verdict "
            f"{'pass' if first['robustness']['verdict']['passed'] else 'fail'}.",
        ]
    )
    print(table)
    write_result(
        "pipeline",
        f"{machine_header()}\n\n`medtransfer run` (the flow `make demo` runs) on the synthetic default, "
        f"in a fresh folder, each run its own process including Prefect's temporary server start.\n\n{table}",
    )


if __name__ == "__main__":
    main()
