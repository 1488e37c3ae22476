"""Gray against colour on a colour set, side by side; BreastMNIST's gray AUC unchanged.

The colour set is synthetic (``tests/colour_samples.py``): a stain-like textured background
with one blob whose hue (reddish or greenish, at equal ITU-R BT.601 luma) is the finding. It is
built to need colour, so it shows that colour reaches the model, not how much colour helps on
real data. Each arm ingests the same ``.npz`` with ``data.channels`` gray or auto (colour),
then trains the same teacher, strategy and epochs and evaluates on the same test images: test
AUC with its 95% patient-bootstrap interval (each image its own patient).

``--breast-only`` runs BreastMNIST (``/work/shared/data/breastmnist.npz``, gray) alone, with
the code on ``PYTHONPATH``: run it once on main and once here to compare (the gray dataset and
the gray student are byte-identical by test, so the figure must be equal).

    python -m benchmarks.colour                  # both, writes benchmarks/results/colour.md
    PYTHONPATH=../main python -m benchmarks.colour --breast-only   # main's figure, printed
    python -m benchmarks.colour --png-folder   # the hue set as a PNG folder + labels CSV,
                                               # appended to benchmarks/results/colour.md

``--png-folder`` writes the same kind of hue images as PNG files (two per patient) with a
``labels.csv`` naming each file, its label and its patient: the image-folder path end to end
(``tasks/data/image_files.py``), split by patient by the pipeline itself (fractions chosen to
give about the ``.npz`` arms' train/val/test sizes), gray against colour.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine_header, write_result
from tasks import config as code_under_test

# The params.yaml of the code that runs (main's has no data.channels)
REPO = Path(code_under_test.__file__).resolve().parent.parent
SIZE = 32  # px: small, for a 2-core machine shared by eight
BREAST = Path("/work/shared/data/breastmnist.npz")
TRAIN = [
    "train.teacher=efficientnet-lite0",
    "train.strategy=linear_probe",
    "train.epochs=30",
    "train.batch_size=64",
    "train.augment.flip=false",
    "train.augment.rotate_degrees=0",
    "train.augment.scale=0",
    "train.augment.translate=0",
    "train.augment.contrast_gamma=0",
    "train.augment.noise_std=0",
    "eval.gradcam_examples=1",  # 0 crashes gradcam_grid (an empty stack), on main too
]


def run_arm(root: Path, source: Path, size: int, extra: list[str]) -> dict:
    """Ingest ``source``, train and evaluate in ``root``; the test AUC, its interval and n."""
    from tasks.config import load_params
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.train import run_train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    params = load_params(
        REPO / "params.yaml",
        [
            f"data.source={source}",
            f"data.image_size={size}",
            f"data.processed_dir={root / 'processed'}",
            f"reports_dir={root / 'reports'}",
            f"train.model_dir={root / 'student'}",
            f"train.checkpoint_dir={root / 'checkpoints'}",
            *TRAIN,
            *extra,
        ],
    )
    run_ingest(params, progress=False)
    start = time.perf_counter()
    run_train(params, progress=False)
    seconds = time.perf_counter() - start
    test = run_evaluate(params)["test"]
    return {
        "auc": test["auc"],
        "low": test["ci95"]["auc"]["low"],
        "high": test["ci95"]["auc"]["high"],
        "n": test["n_images"],
        "train_s": seconds,
    }


def row(name: str, result: dict) -> str:
    return (
        f"| {name} | {result['auc']:.3f} | [{result['low']:.3f}, {result['high']:.3f}] | "
        f"{result['n']} | {result['train_s']:.0f} |"
    )


def png_folder_section(tmp: Path, sizes: tuple[int, int, int]) -> str:
    """Gray against colour on the hue set written as a PNG folder with a labels CSV: the
    markdown section appended to the results."""
    from tests.colour_samples import write_hue_image_folder

    total = sum(sizes)
    folder = write_hue_image_folder(tmp / "hue-png", total, SIZE, seed=7)
    split = [
        "data.labels_csv=labels.csv",
        f"data.val_fraction={sizes[1] / total:.4f}",
        f"data.test_fraction={sizes[2] / total:.4f}",
    ]
    gray = run_arm(tmp / "png-gray", folder, SIZE, [*split, "data.channels=gray"])
    print(json.dumps({"png_gray": gray}), flush=True)
    colour = run_arm(tmp / "png-colour", folder, SIZE, [*split, "data.channels=auto"])
    print(json.dumps({"png_colour": colour}), flush=True)
    header = "| arm | test AUC | 95% CI (patient bootstrap) | n test | train s |\n| --- | --- | --- | --- | --- |"
    return "\n".join(
        [
            "",
            "## The hue set as a PNG folder with a labels CSV: gray against colour",
            "",
            machine_header(),
            "",
            f"`python -m benchmarks.colour --png-folder`: {total} hue images (seed 7) written as "
            "PNG files, two per patient, with `labels.csv` (`path`, `label`, `patient`); the "
            "pipeline splits by patient (`split_by: patient`) with fractions giving about "
            f"{sizes[0]}/{sizes[1]}/{sizes[2]} train/val/test images. Same teacher, strategy, "
            "epochs and size as above. Intervals: 95% patient bootstrap (two images per "
            "patient, so wider for the same n than the `.npz` arms, where each image is its "
            "own patient).",
            "",
            header,
            row("gray (`data.channels=gray`)", gray),
            row("colour (`data.channels=auto`)", colour),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breast-only", action="store_true")
    parser.add_argument("--png-folder", action="store_true")
    parser.add_argument("--sizes", default="150,50,150", help="train,val,test images")
    args = parser.parse_args()
    os.environ.setdefault("MEDTRANSFER_PATIENT_SALT", "benchmark")
    if args.png_folder:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = tuple(int(n) for n in args.sizes.split(","))
            section = png_folder_section(Path(tmp), sizes)
        print(section)
        results = REPO / "benchmarks" / "results" / "colour.md"
        results.write_text(results.read_text().rstrip("\n") + "\n" + section + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.breast_only:
            from tests.colour_samples import write_hue_npz

            sizes = tuple(int(n) for n in args.sizes.split(","))
            hue = write_hue_npz(tmp / "hue.npz", sizes, SIZE, seed=7)
            gray = run_arm(tmp / "gray", hue, SIZE, ["data.channels=gray"])
            print(json.dumps({"hue_gray": gray}), flush=True)
            colour = run_arm(tmp / "colour", hue, SIZE, ["data.channels=auto"])
            print(json.dumps({"hue_colour": colour}), flush=True)
        breast = run_arm(tmp / "breast", BREAST, SIZE, [])
        print(json.dumps({"breastmnist_gray": breast}), flush=True)
        if args.breast_only:
            return
    header = "| arm | test AUC | 95% CI (bootstrap) | n test | train s |\n| --- | --- | --- | --- | --- |"
    body = "\n".join(
        [
            machine_header(),
            "",
            "Same teacher (EfficientNet-Lite0), strategy (linear_probe on frozen features, no "
            "augmentation), 30 epochs, 32 px. The colour set is SYNTHETIC "
            "(`tests/colour_samples.py`, seed 7, "
            f"{sizes[0]}/{sizes[1]}/{sizes[2]} train/val/test): its finding is a blob's hue at "
            "equal luma, made to need colour; it says colour reaches the model, not how much "
            "colour helps on real fundus, dermoscopy or histology images.",
            "",
            "## Synthetic hue set: gray against colour",
            "",
            header,
            row("gray (`data.channels=gray`)", gray),
            row("colour (`data.channels=auto`)", colour),
            "",
            "## BreastMNIST (gray): unchanged",
            "",
            header,
            row("this branch", breast),
        ]
    )
    print(body)
    write_result("colour", body)


if __name__ == "__main__":
    main()
