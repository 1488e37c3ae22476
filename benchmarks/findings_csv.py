"""Findings from a labels CSV through ``medtransfer run`` and the served Bento: a PNG folder of
synthetic multi-finding chest scenes with a CheXpert-layout table (uncertain ``-1`` cells under
``data.uncertain``, blank cells absent), the per-finding table the run reports, and the reply
``bentoml serve`` gives for an image with several findings (JSON as returned).

A measurement of the path, on synthetic data (three independent findings), not tuned to.

    python -m benchmarks.findings_csv [--images 300 --size 64 --epochs 4 --uncertain ignore]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.multilabel import table
from benchmarks.report import machine_header, write_result
from tasks.config import load_params
from tasks.data.synthetic import FINDING_NAMES
from tests.deploy.conftest import post_png_to_bento
from tests.finding_samples import CHEXPERT_CSV, write_finding_folder

REPO = Path(__file__).resolve().parents[1]


def params_file(root: Path, folder: Path, args: argparse.Namespace) -> Path:
    """The run's params.yaml: the folder and its CheXpert table, every output under ``root``,
    short attacks, the quality gates off (the path is measured, not the model)."""
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.source={folder}",
            f"data.labels_csv={folder.parent / CHEXPERT_CSV}",
            f"data.findings=[{','.join(FINDING_NAMES)}]",
            f"data.uncertain={args.uncertain}",
            f"data.image_size={args.size}",
            f"data.processed_dir={root / 'processed'}",
            f"reports_dir={root / 'reports'}",
            "train.teacher=efficientnet-lite0",
            f"train.strategy={args.strategy}",
            f"train.epochs={args.epochs}",
            f"train.model_dir={root / 'student'}",
            f"train.checkpoint_dir={root / 'checkpoints'}",
            "eval.calibration=temperature",
            "robustness.max_samples=16",
            "robustness.epsilons_255=[1]",
            "robustness.reference_probe=false",
            "gates.min_clean_auc=null",
            "gates.max_teacher_transfer_success=null",
            "gates.max_universal_fooling=null",
            "gates.min_worst_group_auc=null",
            "registry.model_name=findings-csv",
            f"serving.bentoml_home={root / 'bentoml'}",
            f"serving.export_dir={root / 'bentos'}",
            f"serving.monitor_store={root / 'monitor.sqlite'}",
            "serving.ood_gate=false",
        ],
    )
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


def served_reply(bento: str, home: Path, image: Path, root: Path) -> dict:
    """``bentoml serve`` the Bento on loopback, post ``image`` to ``/classify/png``, stop it."""
    reply = post_png_to_bento(bento, home, image.read_bytes(), root / "server.log")
    reply.raise_for_status()
    return reply.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--strategy", default="linear_probe")
    parser.add_argument("--uncertain", default="ignore")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = _run_and_serve(args, Path(tmp))
    body = _body(args, outcome)
    print(body)
    print(write_result("findings-csv", body))


def _run_and_serve(args: argparse.Namespace, root: Path) -> dict:
    """``medtransfer run`` on a generated finding folder under ``root``, then one served
    reply for an image with several findings: the wall time, the reports, the reply."""
    folder, truth = write_finding_folder(root / "data" / "images", args.images, args.size, 11)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MEDTRANSFER_ARTIFACT_ROOT": str(root / "mlartifacts"),
        "PREFECT_HOME": str(root / "prefect"),
    }
    command = ["flows.cli", "run", "--params", str(params_file(root, folder, args)), "--quiet"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command], env=env, cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    reports = root / "reports"
    package = json.loads((reports / "package.json").read_text())
    several = int(np.flatnonzero(truth.sum(axis=1) >= 2)[-1])
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MEDTRANSFER_ARTIFACT_ROOT")})
    image = folder / f"img/{several:04d}.png"
    return {
        "seconds": seconds,
        "ingest": json.loads((reports / "ingest.json").read_text()),
        "metrics": json.loads((reports / "metrics.json").read_text()),
        "reply": served_reply(package["bento"], root / "bentoml", image, root),
        "unknown": int(np.isnan(np.load(root / "processed" / "labels.npy")).sum()),
        "drawn": [name for name, v in zip(FINDING_NAMES, truth[several], strict=True) if v],
    }


def _body(args: argparse.Namespace, outcome: dict) -> str:
    """The results file's text for :func:`_run_and_serve`'s ``outcome``."""
    ingest = outcome["ingest"]
    return "\n\n".join(
        [
            machine_header(),
            f"A PNG folder of {args.images} synthetic multi-finding chest scenes ({args.size} px, "
            "two images per patient) with a CheXpert-layout labels CSV (`Path`, `patient`, one "
            "column per finding; every 7th cell `-1`, half the absent cells blank), "
            f"`data.uncertain: {args.uncertain}`, through `medtransfer run` ({args.strategy}, "
            f"{args.epochs} epochs, temperature per finding; quality gates off): "
            f"{outcome['seconds']:.0f} s wall clock. Ingest: {ingest['images']} images, split "
            f"by {ingest['split_by']}, positives per finding {ingest['classes']}, "
            f"{outcome['unknown']} unknown (NaN) image-finding cells.",
            table(outcome["metrics"]),
            f"Served reply (`bentoml serve` on loopback, `POST /classify/png`) for an image drawn "
            f"with the findings {outcome['drawn']}, JSON as returned:",
            "```json\n" + json.dumps(outcome["reply"], indent=2) + "\n```",
            "Command: `python -m benchmarks.findings_csv "
            f"--images {args.images} --size {args.size} --epochs {args.epochs} "
            f"--uncertain {args.uncertain}`.",
        ]
    )


if __name__ == "__main__":
    main()
