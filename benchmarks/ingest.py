"""Ingestion throughput and memory: the ingestion stage against a naive pydicom loop.

Generates N synthetic 512x512 16-bit DICOM files once (cached under ``--cache``), then runs,
alternating and each in a fresh process so peak RSS is its own:

- ``stage``: ``tasks.stages.ingest.run_ingest`` with the default worker count (one per core);
- ``naive``: one process, ``dcmread`` → ``pixel_array`` → modality LUT → VOI LUT → resize,
  collecting every image in a list and stacking at the end.

Prints files/s, MB/s (input bytes) and peak RSS (parent plus its largest worker) as medians
over ``--repeats`` runs, with the ratio, and writes the table with machine, versions and date
to ``benchmarks/results/ingest.md``.

Usage: ``python -m benchmarks.ingest [--n 2000] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import machine_header, write_result

IMAGE_SIZE = 128


def generate(cache: Path, n: int) -> Path:
    """N uncompressed 16-bit 512x512 synthetic files; returns the DICOM folder."""
    from tasks.config import load_params
    from tasks.data import synthetic

    params = load_params(
        "params.yaml",
        [
            f"synthetic.output_dir={cache / f'synthetic_{n}'}",
            f"synthetic.n_patients={n // 2}",
            "synthetic.images_per_patient_min=2",
            "synthetic.images_per_patient_max=2",
            "synthetic.size=512",
            "synthetic.rle_fraction=0.0",
            "synthetic.multiframe_fraction=0.0",
            "seed=0",
        ],
    )
    config = dataclasses.replace(
        synthetic.SyntheticConfig.from_params(params), bits_stored_choices=(16,)
    )
    folder, _ = synthetic.generate(config)
    return folder


def run_stage(folder: Path, out: Path) -> dict:
    from tasks.config import load_params
    from tasks.data.ingestion import ingest_folder
    from tasks.data.labels import read_label_source

    params = load_params(
        "params.yaml",
        [
            f"data.source={folder}",
            f"data.processed_dir={out / 'processed'}",
            f"data.image_size={IMAGE_SIZE}",
            "data.workers=0",
        ],
    )
    labels = read_label_source(folder, str(folder / "labels.csv"))
    start = time.perf_counter()
    result = ingest_folder(folder, labels, params.data, 0, "benchmark", progress=False)
    return {"seconds": time.perf_counter() - start, "images": result.images}


def run_naive(folder: Path) -> dict:
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    files = sorted(folder.rglob("*.dcm"))
    start = time.perf_counter()
    images = []
    for path in files:
        ds = pydicom.dcmread(path)
        values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        low, high = float(values.min()), float(values.max())
        display = ((values - low) / max(high - low, 1e-6)).astype(np.float32)
        resized = Image.fromarray(display, mode="F").resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX
        )
        images.append((np.asarray(resized) * 255).astype(np.uint8))
    stacked = np.stack(images)
    return {"seconds": time.perf_counter() - start, "images": len(stacked)}


def child(variant: str, folder: Path, out: Path) -> None:
    """Run one variant and print its timing and peak memory as JSON."""
    result = run_stage(folder, out) if variant == "stage" else run_naive(folder)
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mib"] = (self_kib + children_kib) / 1024
    print(json.dumps(result))


def measure(variant: str, folder: Path, out: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.ingest",
            "--child",
            variant,
            "--folder",
            str(folder),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[1000, 2000],
        help="file counts (the last is the headline)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medtransfer-bench"))
    parser.add_argument("--child", choices=["stage", "naive"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.out)
        return

    rows = []
    for n in args.n:
        print(f"generating {n} files ...", flush=True)
        folder = generate(args.cache, n)
        input_mb = sum(p.stat().st_size for p in folder.rglob("*.dcm")) / 1e6
        runs: dict[str, list[dict]] = {"naive": [], "stage": []}
        for repeat in range(args.repeats):
            for variant in ("naive", "stage"):  # alternate so drift hits both alike
                runs[variant].append(measure(variant, folder, args.cache / "out"))
                print(f"  n={n} run {repeat + 1} {variant}: {runs[variant][-1]}", flush=True)
        for variant, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            rows.append(
                {
                    "n": n,
                    "variant": variant,
                    "files_per_s": n / seconds,
                    "mb_per_s": input_mb / seconds,
                    "seconds": seconds,
                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
                    "output_mib": n * IMAGE_SIZE * IMAGE_SIZE / 2**20,
                }
            )

    lines = [
        "| files | variant | files/s | MB/s | median s | peak RSS MiB | output array MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['n']} | {row['variant']} | {row['files_per_s']:.1f} | {row['mb_per_s']:.1f} | "
            f"{row['seconds']:.2f} | {row['peak_rss_mib']:.0f} | {row['output_mib']:.1f} |"
        )
    for n in args.n:
        by = {r["variant"]: r for r in rows if r["n"] == n}
        lines.append("")
        lines.append(
            f"n={n}: stage / naive throughput = {by['stage']['files_per_s'] / by['naive']['files_per_s']:.2f}x"
        )
    table = "\n".join(lines)
    print(table)
    write_result(
        "ingest",
        f"{machine_header()}\n\nSynthetic 512x512 16-bit uncompressed DICOM → {IMAGE_SIZE}x{IMAGE_SIZE} uint8; "
        f"medians of {args.repeats} alternating runs, each in a fresh process. Peak RSS = parent's max "
        "RSS + largest worker's max RSS.\n\n" + table,
    )


if __name__ == "__main__":
    main()
