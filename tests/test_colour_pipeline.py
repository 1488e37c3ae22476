"""A colour .npz and a colour DICOM folder through every stage, and served as colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.config import Params
from tests.colour_samples import hue_set, write_hue_dicom_folder, write_hue_npz

# The smallest run that goes through every stage: a cached-feature linear probe, one epoch,
# the tiny robustness sweep of tests/test_flow.py, gates off (a one-epoch student is no good).
TINY = [
    "data.image_size=32",
    "train.strategy=linear_probe",
    "train.epochs=1",
    "train.augment.flip=false",
    "train.augment.rotate_degrees=0",
    "train.augment.scale=0",
    "train.augment.translate=0",
    "train.augment.contrast_gamma=0",
    "train.augment.noise_std=0",
    "eval.gradcam_examples=1",
    "eval.bootstrap=100",
    "robustness.max_samples=4",
    "robustness.epsilons_255=[1]",
    "robustness.pgd_steps=1",
    "robustness.reference_probe=false",
    "robustness.apgd_steps=2",
    "robustness.universal_images=2",
    "robustness.universal_steps=1",
    "robustness.square_max_samples=2",
    "robustness.square_queries=2",
    "gates.min_clean_auc=null",
    "gates.max_teacher_transfer_success=null",
    "gates.max_universal_fooling=null",
]


def _every_stage(params: Params) -> dict:
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.register import run_register
    from tasks.stages.robustness import run_robustness
    from tasks.stages.train import run_train

    ingest = run_ingest(params, progress=False)
    run_train(params, progress=False)
    metrics = run_evaluate(params)
    robustness = run_robustness(params, progress=False)
    register = run_register(params)
    return {"ingest": ingest, "metrics": metrics, "robustness": robustness, "register": register}


@pytest.fixture
def colour_params(params: Params, tmp_path: Path, fresh_mlflow_store: str) -> Params:
    return params.with_overrides(
        [
            *TINY,
            f"train.model_dir={tmp_path / 'models/student'}",
            f"train.checkpoint_dir={tmp_path / 'models/checkpoints'}",
            f"serving.bentoml_home={tmp_path / 'bentoml'}",
            f"serving.export_dir={tmp_path / 'bentos'}",
        ]
    )


def test_a_colour_npz_and_a_colour_dicom_folder_run_every_stage_and_are_served_as_colour(
    colour_params: Params, tmp_path: Path
) -> None:
    import bentoml

    from tasks.model.inference import InputRejected, Predictor, prepare_png
    from tasks.model.student_io import load_student
    from tasks.stages.package import run_package
    from tests.test_colour import _png

    # BentoML's store: serving.bentoml_home in tmp_path, unless an earlier test of this
    # process already bound BentoML to another (BENTOML_HOME set by its package stage)
    npz = write_hue_npz(tmp_path / "hue.npz", (16, 8, 8), 32, seed=1)
    folder = write_hue_dicom_folder(tmp_path / "dicom", 24, 32, seed=2)
    for source, kind in ((npz, "npz"), (folder, "dicom_folder")):
        params = colour_params.with_overrides([f"data.source={source}"])
        done = _every_stage(params)
        assert done["ingest"].channels == 3 and done["ingest"].source_kind == kind
        assert 0.0 <= done["metrics"]["test"]["auc"] <= 1.0
        assert done["robustness"]["verdict"]["passed"] is True
        _, spec = load_student(params.train.model_dir)
        assert spec.channels == 3
    # the last registered (the DICOM folder's student), packaged and served as colour
    package = run_package(
        params.with_overrides([f"registry.version={done['register']['version']}"])
    )
    predictor = Predictor.from_folder(bentoml.models.get(package["bento_model"]).path)
    assert predictor.spec.channels == 3
    image = hue_set(1, 32, seed=9)[0][0]
    probs = predictor.predict_images(prepare_png(_png(image), 32, channels=3)[None])
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0)
    with pytest.raises(InputRejected, match="colour images"):
        prepare_png(_png(image[..., 1]), 32, channels=3)


MARKER = "ZQXNAMEMARKER"


def test_a_png_folder_with_a_labels_csv_runs_the_flow_and_is_served_as_colour_leaving_no_names(
    prefect_harness, colour_params: Params, tmp_path: Path
) -> None:
    import bentoml
    import yaml

    from flows.pipeline import medtransfer_pipeline
    from tasks.model.inference import Predictor, prepare_png
    from tests.colour_samples import write_hue_image_folder
    from tests.test_colour import _png

    # a marker in every file name, patient, PNG text chunk and JPEG EXIF description
    folder = write_hue_image_folder(
        tmp_path / "images", 24, 32, 11, gray_every=7, jpeg_every=5, marker=MARKER
    )
    params = colour_params.with_overrides(
        [f"data.source={folder}", "data.labels_csv=labels.csv", "data.name=hue-png"]
    )
    params_file = tmp_path / "flow.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    done = medtransfer_pipeline(params_file=str(params_file))
    assert done["ingest"]["source_kind"] == "image_folder"
    assert done["ingest"]["split_by"] == "patient" and done["ingest"]["channels"]["channels"] == 3
    bento_model = bentoml.models.get(done["package"]["bento_model"])
    predictor = Predictor.from_folder(bento_model.path)
    assert predictor.spec.channels == 3
    image = np.asarray(__import__("PIL.Image").Image.open(folder / f"sub/{MARKER}0000.png"))
    probs = predictor.predict_images(prepare_png(_png(image), 32, channels=3)[None])
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0)
    # names are data: only manifest.csv / quarantine.csv keep file names (README)
    kept = {Path(params.data.processed_dir) / n for n in ("manifest.csv", "quarantine.csv")}
    written = [
        *(p for p in tmp_path.rglob("*") if folder not in p.parents),
        *Path(bento_model.path).rglob("*"),
        Path(done["package"]["archive"]),
    ]
    leaked = [
        str(p.relative_to(tmp_path) if tmp_path in p.parents else p.name)
        for p in written
        if p.is_file() and p not in kept and MARKER.encode() in p.read_bytes()
    ]
    assert leaked == []
