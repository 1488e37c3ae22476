"""Recording benchmark results with the machine, versions and date they were measured on."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "monai", "pydicom", "numpy", "pillow", "prefect", "mlflow", "bentoml", "dvc")


def machine_header() -> str:
    """A markdown paragraph naming date, commit, CPU, core count, Python and package versions
    (the commit so that a figure can be told stale once the code it measured has moved)."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return (
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- commit: {_commit()}\n"
        f"- machine: {cpu}, {os.cpu_count()} cores, GPU: {gpu}\n"
        f"- python {platform.python_version()}; {', '.join(versions)}"
    )


def _commit() -> str:
    """The checkout's short commit, ``+changes`` when tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_result(name: str, body: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(f"# Benchmark: {name}\n\n{body}\n")
    return path
