"""Colour kept as colour (data.channels), and gray exactly as it was before colour existed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data.dataset import load_processed
from tasks.data.dicom_io import decode_file
from tasks.errors import MedtransferError
from tasks.model.inference import InputRejected, prepare_dicom, prepare_png
from tasks.model.student import build_student
from tasks.model.transforms import train_transform
from tasks.stages.ingest import run_ingest
from tests.colour_samples import colour_dicom, hue_set, write_hue_npz
from tests.conftest import SMALL_TRAINING_SET

# Computed on main (6eff593) before colour existed, with the session salt "test-salt": the
# small training set's images.npy, labels.npy and dataset.json, and a seeded gray student's
# logits on its first four images. Colour must leave every one of them as it was. (The DVC
# hash of the folder moved once, with manifest.csv's grouping columns: figures by group.)
GRAY_IMAGES_SHA256 = "0b61d091e28c452d065cc4ff26191a89b400ed1fd63d45009de4c0271a25c2e4"
GRAY_FILES_SHA256_PREFIX = {"dataset.json": "c6c9b83300d6a73d", "labels.npy": "793882ba528a8363"}
PROCESSED_FILES = {"dataset.json", "images.npy", "labels.npy", "manifest.csv", "quarantine.csv"}
GRAY_LOGITS = [
    [0.0789821445941925, -2.430041790008545],
    [-0.5661589503288269, -1.8729902505874634],
    [-0.2554205358028412, -1.97892165184021],
    [0.1201464831829071, -1.9386374950408936],
]


def test_a_gray_dataset_and_a_gray_students_logits_are_unchanged(
    small_training_set: Path,
) -> None:
    processed = small_training_set / "processed"
    assert {path.name for path in processed.iterdir()} == PROCESSED_FILES  # no staging leftover
    for name, prefix in GRAY_FILES_SHA256_PREFIX.items():
        assert hashlib.sha256((processed / name).read_bytes()).hexdigest()[:16] == prefix, name
    images = (processed / "images.npy").read_bytes()
    assert hashlib.sha256(images).hexdigest() == GRAY_IMAGES_SHA256
    dataset = load_processed(processed)
    assert dataset.channels == 1 and "channels" not in dataset.info
    torch.manual_seed(0)
    student = build_student("efficientnet-lite0", "partial", num_classes=2).eval()
    x = torch.from_numpy(dataset.images[:4].astype(np.float32)[:, None] / 255.0)
    with torch.no_grad():
        logits = student(x).numpy()
    np.testing.assert_allclose(logits, GRAY_LOGITS, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hue_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hue_npz(tmp_path_factory.mktemp("hue") / "hue.npz", (8, 4, 4), 32, 0)


def test_an_rgb_npz_stays_three_channels_in_the_processed_dataset(params, hue_npz: Path) -> None:
    result = run_ingest(params.with_overrides([f"data.source={hue_npz}"]), progress=False)
    dataset = load_processed(params.data.processed_dir)
    assert result.channels == 3 and dataset.channels == 3 and dataset.info["channels"] == 3
    assert dataset.images.shape == (16, 3, 32, 32)
    with np.load(hue_npz) as archive:
        first = archive["train_images"][0]  # (32, 32, 3): the same size, so stored as is
    np.testing.assert_array_equal(dataset.images[0], np.moveaxis(first, -1, 0))


def test_channels_gray_makes_an_rgb_npz_luma_as_before(params, hue_npz: Path) -> None:
    overrides = [f"data.source={hue_npz}", "data.channels=gray"]
    run_ingest(params.with_overrides(overrides), progress=False)
    dataset = load_processed(params.data.processed_dir)
    with np.load(hue_npz) as archive:
        first = archive["train_images"][0].astype(np.float32) / 255.0
    luma = first @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert dataset.images.shape == (16, 32, 32)
    np.testing.assert_array_equal(dataset.images[0], np.rint(luma * 255).astype(np.uint8))


def test_channels_rgb_on_a_gray_source_is_one_line(params, small_training_set: Path) -> None:
    shutil.copytree(small_training_set / "synthetic", Path(params.synthetic.output_dir))
    overrides = [*SMALL_TRAINING_SET, "data.channels=rgb"]
    with pytest.raises(MedtransferError, match=r"data\.channels is rgb but none of the") as err:
        run_ingest(params.with_overrides(overrides), progress=False)
    assert "\n" not in str(err.value)
    assert not Path(params.data.processed_dir).exists()


def test_training_a_gray_model_on_a_colour_dataset_is_one_line(params, hue_npz: Path) -> None:
    from tasks.data.channels import check_training_channels

    check_training_channels("auto", 3)
    check_training_channels("rgb", 3)
    check_training_channels("gray", 1)
    with pytest.raises(MedtransferError, match=r"data\.channels is gray but the processed"):
        check_training_channels("gray", 3)
    with pytest.raises(MedtransferError, match=r"data\.channels is rgb but the processed"):
        check_training_channels("rgb", 1)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_dicom_decodes_to_its_rgb_pixels(tmp_path: Path, photometric: str) -> None:
    images, _ = hue_set(1, 32, 3)
    path = tmp_path / "c.dcm"
    colour_dicom(images[0], photometric).save_as(path, enforce_file_format=True)
    decoded = decode_file(path, colour=True)
    assert decoded.frames.shape == (1, 32, 32, 3)
    # YBR_FULL through pydicom's conversion and back rounds by at most one level
    tolerance = 0 if photometric == "RGB" else 1
    assert np.abs(decoded.frames[0] * 255 - images[0]).max() <= tolerance + 1e-3
    gray = decode_file(path)
    assert gray.frames.shape == (1, 32, 32) and gray.notes == ["rgb_to_gray"]


def test_palette_colour_dicom_keeps_the_palettes_colours() -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut, pixel_array

    path = get_testdata_file("OBXXXX1A.dcm")  # PALETTE COLOR, 8-bit indices
    ds = dcmread(path)
    rgb = apply_color_lut(pixel_array(ds), ds).astype(np.float32)
    decoded = decode_file(path, colour=True)
    assert decoded.notes[-1] == "palette_to_rgb"
    np.testing.assert_allclose(decoded.frames[0], rgb / rgb.max(), atol=1e-6)


def test_the_colour_jitter_moves_colour_images_and_is_off_for_gray(params) -> None:
    augment = params.train.augment
    colour = train_transform(augment, 32, channels=3)
    gray = train_transform(augment, 32, channels=1)
    assert any(type(t).__name__ == "RandColourJitter" for t in colour.transforms)
    assert not any(type(t).__name__ == "RandColourJitter" for t in gray.transforms)
    jitter = next(t for t in colour.transforms if type(t).__name__ == "RandColourJitter")
    jitter.set_random_state(0)
    jitter.prob = 1.0
    image = torch.full((3, 4, 4), 0.5)
    image[0] = 0.8
    out = jitter(image)
    assert out.shape == (3, 4, 4) and not torch.allclose(out, image)


def test_a_colour_student_uses_the_teachers_three_channel_stem() -> None:
    torch.manual_seed(0)
    student = build_student("efficientnet-lite0", "partial", num_classes=2, channels=3).eval()
    stem = next(m for m in student.backbone.stem.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 3
    assert student(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(MedtransferError, match=r"expects images shaped \(batch, 3"):
        student(torch.rand(2, 1, 32, 32))


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_colour_model_refuses_a_gray_upload_and_keeps_a_colour_one(tmp_path: Path) -> None:
    images, _ = hue_set(1, 32, 5)
    colour = prepare_png(_png(images[0]), 32, channels=3)
    np.testing.assert_array_equal(colour, np.moveaxis(images[0], -1, 0))
    with pytest.raises(InputRejected) as err:
        prepare_png(_png(images[0][..., 0]), 32, channels=3)
    assert err.value.status == 422 and err.value.reason == "channel_mismatch"
    assert "\n" not in err.value.message
    path = tmp_path / "c.dcm"
    colour_dicom(images[0]).save_as(path, enforce_file_format=True)
    assert prepare_dicom(path.read_bytes(), 32, channels=3).shape == (3, 32, 32)
    # a gray model takes the colour upload as luma (the documented rule), as before
    assert prepare_dicom(path.read_bytes(), 32).shape == (32, 32)


def test_train_refuses_rgb_on_a_gray_dataset_and_gray_on_a_colour_one_before_any_run(
    train_params, tmp_path: Path, fresh_mlflow_store: str
) -> None:
    from mlflow import MlflowClient

    from tasks.stages.train import run_train

    rgb = train_params.with_overrides(["data.channels=rgb"])  # the processed set is gray
    with pytest.raises(MedtransferError, match=r"data\.channels is rgb but the processed") as err:
        run_train(rgb, progress=False)
    assert "\n" not in str(err.value)
    npz = write_hue_npz(tmp_path / "hue.npz", (8, 4, 4), 32, 0)
    colour = train_params.with_overrides([f"data.source={npz}", "data.image_size=32"])
    run_ingest(colour, progress=False)
    gray = colour.with_overrides(["data.channels=gray"])  # the processed set is colour
    with pytest.raises(MedtransferError, match=r"data\.channels is gray but the processed") as err:
        run_train(gray, progress=False)
    assert "\n" not in str(err.value)
    assert not Path(train_params.train.model_dir).exists()
    experiment = MlflowClient(fresh_mlflow_store).get_experiment_by_name("medtransfer")
    assert experiment is None or not MlflowClient(fresh_mlflow_store).search_runs(
        [experiment.experiment_id]
    )
