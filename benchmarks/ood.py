"""When the service does not answer: the scope gate and OOD abstention on held-back
in-distribution images and on out-of-distribution families.

For each dataset (the synthetic default and a MedMNIST ``.npz``), trains a small student
(``linear_probe``, 64 px, a few epochs: the detector works on the student's own features, so a
quick student is enough to measure it), records the profile packaging records
(:func:`tasks.registry.profile_fit.fit_profile`: scope, detector fit on the training split,
threshold on validation at ``serving.ood_false_rejection``), then runs each input family through
the service's own path (:func:`tasks.model.inference.prepare_dicom` with the scope, or
``prepare_png``; the student's features; the detector) and counts:

- ``held-back``: the test split, never seen by the detector or its threshold (DICOM files for
  the synthetic set, PNGs of the processed images for the ``.npz``): the accepted share should
  be about ``1 - ood_false_rejection``;
- ``CT`` / ``MR``: every CT and MR slice of pydicom's test data (DICOM);
- ``photographs``: scikit-image's sample images and four crops of each (PNG);
- ``noise``: uniform and Gaussian noise, as PNG and as DICOM; ``blank``: constant images.

Each share comes with its 95% Wilson interval and n. Also the AUROC of each OOD method
(knn, mahalanobis, energy) between held-back and all OOD images, to choose the default.

Usage: ``python -m benchmarks.ood [--npz ../shared/data/breastmnist.npz] [--epochs 3]``;
writes ``benchmarks/results/ood.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import machine_header, write_result

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


def train(root: Path, source: str, epochs: int):
    """Ingest ``source`` and train a linear-probe student; returns (params, model, spec, data)."""
    from tasks.config import load_params
    from tasks.data.dataset import load_processed
    from tasks.model.student_io import load_student
    from tasks.stages.ingest import run_ingest
    from tasks.stages.synthesize import run_synthesize
    from tasks.stages.train import run_train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MEDTRANSFER_ARTIFACT_ROOT"] = str(root / "mlartifacts")
    overrides = [
        f"reports_dir={root / 'reports'}",
        f"data.processed_dir={root / 'processed'}",
        f"data.image_size={SIZE}",
        f"synthetic.output_dir={root / 'synthetic'}",
        f"train.model_dir={root / 'student'}",
        f"train.checkpoint_dir={root / 'checkpoints'}",
        "train.strategy=linear_probe",
        f"train.epochs={epochs}",
        "train.amp=false",
        "eval.gradcam_examples=1",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    if source == "synthetic":
        folder = run_synthesize(params)["dicom_dir"]
        params = params.with_overrides([f"data.source={folder}"])
    else:
        params = params.with_overrides([f"data.source={source}"])
    run_ingest(params, progress=False)
    run_train(params, progress=False)
    model, spec = load_student(params.train.model_dir)
    return params, model, spec, load_processed(params.data.processed_dir)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_dicom(pixels: np.ndarray) -> bytes:
    from tests.conftest import make_mono_dataset
    from tests.deploy.samples import dataset_bytes

    return dataset_bytes(make_mono_dataset(pixels.astype(np.uint16), bits_stored=12))


def families(dataset, source_folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Input families: ``(kind, bytes)`` per image, kind ``dicom`` or ``png``; held-back DICOM
    files are read from ``source_folder`` (the dataset records no path)."""
    import skimage.data
    from pydicom import dcmread
    from pydicom.data import get_testdata_file, get_testdata_files

    rng = np.random.default_rng(0)
    out: dict[str, list[tuple[str, bytes]]] = {"held-back": []}
    test = dataset.manifest.iloc[dataset.indices("test")]
    source = dataset.source
    if source.kind != "npz":
        folder = source_folder
        out["held-back"] = [
            ("dicom", (folder / n).read_bytes()) for n in sorted(set(test["source_file"]))
        ]
    else:
        images, _ = dataset.subset("test")
        out["held-back"] = [("png", png(image)) for image in images]
    by_modality: dict[str, list[tuple[str, bytes]]] = {"CT": [], "MR": []}
    for path in sorted(set(get_testdata_files("*.dcm"))):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        modality = str(ds.get("Modality", ""))
        if modality in by_modality and "PixelData" in dcmread(path, specific_tags=["PixelData"]):
            by_modality[modality].append(("dicom", Path(path).read_bytes()))
    for name in ("CT_small.dcm", "MR_small.dcm"):  # the two are among them
        assert any(
            Path(get_testdata_file(name)).read_bytes() == d for _, d in out_ct_mr(by_modality)
        )
    out.update(by_modality)
    photos = []
    for name in (
        "astronaut",
        "camera",
        "coffee",
        "chelsea",
        "rocket",
        "cat",
        "hubble_deep_field",
        "immunohistochemistry",
        "moon",
        "page",
        "text",
        "coins",
        "clock",
        "horse",
        "grass",
        "brick",
    ):
        image = getattr(skimage.data, name)()
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        image = image.astype(np.uint8)
        h, w = image.shape[:2]
        photos.append(("png", png(image)))
        for top, left in ((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)):
            photos.append(
                ("png", png(np.ascontiguousarray(image[top : top + h // 2, left : left + w // 2])))
            )
    out["photographs"] = photos
    noise = []
    for i in range(30):
        side = int(rng.integers(32, 512))
        uniform = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
        gaussian = np.clip(rng.normal(128, 40, size=(side, side)), 0, 255).astype(np.uint8)
        noise.append(("png", png(uniform if i % 2 else gaussian)))
        noise.append(("dicom", noise_dicom(rng.integers(0, 4096, size=(side, side)))))
    out["noise"] = noise
    out["blank"] = [
        ("png", png(np.full((s, s), v, dtype=np.uint8)))
        for s in (1, 64, 512)
        for v in range(0, 256, 32)
    ]
    out["blank"] += [("dicom", noise_dicom(np.zeros((s, s)))) for s in (1, 64, 512)]
    return out


def out_ct_mr(by_modality: dict) -> list:
    return [item for items in by_modality.values() for item in items]


def evaluate(params, model, spec, dataset) -> tuple[str, dict]:
    """Shares per family for the configured method, and AUROCs of all methods."""
    from tasks.evaluation.metrics import wilson_interval
    from tasks.model.inference import InputRejected, prepare_dicom, prepare_png
    from tasks.model.profile import Scope, features_and_probabilities
    from tasks.registry.profile_fit import fit_profile

    profiles = {
        m: fit_profile(model, spec, params.with_overrides([f"serving.ood_method={m}"]))
        for m in ("knn", "mahalanobis", "energy")
    }
    scope = Scope(profiles["knn"].scope) if profiles["knn"].scope else None
    rows, scores = [], {m: {} for m in profiles}
    runs = []
    from tasks.registry.profile_fit import source_folder

    for family, items in families(dataset, source_folder(params)).items():
        runs.append((family, items, scope))
        if family in ("CT", "MR") and scope is not None:  # the detector alone, for comparison
            runs.append((f"{family} (no scope gate)", items, None))
    for family, items, gate in runs:
        refused, features = 0, []
        for kind, data in items:
            try:
                image = (
                    prepare_dicom(data, SIZE, multiframe=profiles["knn"].multiframe, scope=gate)
                    if kind == "dicom"
                    else prepare_png(data, SIZE)
                )
            except InputRejected:
                refused += 1
                continue
            features.append(features_and_probabilities(model, image[None])[1][0])
        feats = np.stack(features) if features else np.zeros((0, 0))
        line = [family, str(len(items)), str(refused)]
        for method, profile in profiles.items():
            s = profile.detector.score(feats) if len(feats) else np.zeros(0)
            scores[method][family] = s
            held = refused + int(np.sum(s >= profile.detector.threshold))
            share = held / len(items)
            low, high = wilson_interval(held, len(items))
            shown = 1 - share if family == "held-back" else share
            interval = (1 - high, 1 - low) if family == "held-back" else (low, high)
            line.append(f"{shown:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]")
        rows.append(line)
    aurocs = {}
    for method in profiles:
        inside = scores[method]["held-back"]
        outside = np.concatenate(
            [v for k, v in scores[method].items() if k != "held-back" and "no scope" not in k]
        )
        aurocs[method] = _auroc(inside, outside)
    header = "| family | n | refused (scope, decode) | knn | mahalanobis | energy |\n|---|---|---|---|---|---|\n"
    table = header + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    note = (
        "\n\nShares: held-back = accepted share; other families = abstained or refused share; "
        "95% Wilson intervals. AUROC (held-back vs all OOD that reached the detector): "
        + ", ".join(f"{m} {a:.3f}" for m, a in aurocs.items())
        + f"\n\nThresholds (at serving.ood_false_rejection={params.serving.ood_false_rejection} "
        "on validation): "
        + ", ".join(
            f"{m} {p.detector.threshold:.4g} (val n={p.n_val})" for m, p in profiles.items()
        )
        + f"\n\nScope recorded: {profiles['knn'].scope}"
    )
    return table + note, aurocs


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an OOD score > an in-distribution score), ties counting half."""
    if len(inside) == 0 or len(outside) == 0:
        return float("nan")
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npz", default=str(REPO.parent / "shared" / "data" / "breastmnist.npz"))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    sections = []
    for name, source in (("synthetic default", "synthetic"), (Path(args.npz).name, args.npz)):
        with tempfile.TemporaryDirectory() as tmp:
            params, model, spec, dataset = train(Path(tmp), source, args.epochs)
            table, _ = evaluate(params, model, spec, dataset)
        sections.append(
            f"## {name}\n\nStudent: linear_probe, {SIZE} px, {args.epochs} epochs.\n\n{table}"
        )
        print(sections[-1], flush=True)
    body = (
        "OOD abstention and the scope gate on held-back and out-of-distribution images. "
        "The machine was shared with other work (2 cores).\n\n"
        + machine_header()
        + "\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    print(write_result("ood", body))


if __name__ == "__main__":
    main()
