"""Faults lose nothing and mislabel nothing.

What was ingested is what is logged: a run names the data its dataset was ingested from, not
the ``data.source`` it was started with. Every bad value is one line and exit status 2 from a
real ``medtransfer`` process, before any output is touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.config import Params
from tests.conftest import REPO, make_mono_dataset, write_dataset

# ------------------------------------------------------------ what was ingested is logged


def _dicom_folder(root: Path, patients: int = 12) -> tuple[Path, Path]:
    """A folder of one small DICOM image per patient, two classes, and its labels CSV."""
    rng = np.random.default_rng(0)
    folder = root / "site_a"
    rows = []
    for i in range(patients):
        pixels = rng.integers(0, 4096, (40, 40), dtype=np.uint16)
        write_dataset(make_mono_dataset(pixels, patient_id=f"P{i}"), folder / f"{i}.dcm")
        rows.append((f"{i}.dcm", "effusion" if i % 2 else "clear"))
    labels = root / "site_a_labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(labels, index=False)
    return folder, labels


def test_the_dataset_records_its_name_and_label_source_but_no_path(
    params: Params, tmp_path: Path
) -> None:
    from tasks.data.dataset import read_source
    from tasks.stages.ingest import run_ingest

    folder, labels = _dicom_folder(tmp_path)
    run_ingest(
        params.with_overrides(
            [f"data.source={folder}", f"data.labels_csv={labels}", "data.name=site-a"]
        ),
        progress=False,
    )
    source = read_source(params.data.processed_dir)
    assert (source.kind, source.name, source.labels) == ("dicom_folder", "site-a", "labels CSV")
    assert (source.files_seen, source.ingested, source.quarantined, source.images) == (
        12,
        12,
        0,
        12,
    )
    assert source.image_size == 32 and len(source.content_sha256) == 64


def test_a_model_trained_on_a_dicom_folder_is_logged_by_its_name_whatever_data_source_says(
    params: Params, tmp_path: Path, fresh_mlflow_store: str
) -> None:
    """Ingest a DICOM folder, then train and evaluate with the default ``data.source``
    (the synthetic shorthand): the runs name the dataset as it was ingested (``data.name``,
    never its path)."""
    from mlflow import MlflowClient

    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.train import run_train

    folder, labels = _dicom_folder(tmp_path)
    run_ingest(
        params.with_overrides(
            [f"data.source={folder}", f"data.labels_csv={labels}", "data.name=site-a"]
        ),
        progress=False,
    )
    default = params.with_overrides(
        [
            "train.epochs=1",
            "train.strategy=linear_probe",
            "eval.gradcam_examples=1",
            f"train.model_dir={tmp_path / 'models/student'}",
            f"train.checkpoint_dir={tmp_path / 'models/checkpoints'}",
        ]
    )
    assert default.data.source == "synthetic"  # what train and evaluate are started with

    report = run_train(default, progress=False)
    run_evaluate(default)

    run = MlflowClient(fresh_mlflow_store).get_run(report["run_id"])
    assert default.data.name is None  # nor the name
    assert run.data.params["data.source"] == run.data.params["data.name"] == "site-a"
    assert run.data.params["dataset.source"] == "site-a"
    assert run.data.params["dataset.source_kind"] == "dicom_folder"
    assert run.data.params["data.labels_csv"] == "labels CSV"
    assert run.data.tags["dataset.source"] == "site-a"
    assert run.data.tags["dataset.source_kind"] == "dicom_folder"
    assert run.data.tags["evaluate.dataset.source"] == "site-a"
    assert run.data.metrics["ingest_files_seen"] == 12


# ------------------------------------------------- every bad value: one line, exit 2


@dataclass(frozen=True)
class BadCase:
    """One refused invocation: the command, its extra arguments, what the line must say, and
    an optional set-up writing an input file into the project folder."""

    command: str
    args: tuple[str, ...]
    message: str
    setup: Callable[[Path], None] | None = None


def _npz(project: Path, name: str, **changes: np.ndarray) -> None:
    """A small MedMNIST-format archive ``inputs/<name>.npz`` with ``changes`` applied."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    arrays.update(changes)
    (project / "inputs").mkdir(exist_ok=True)
    np.savez(project / "inputs" / f"{name}.npz", **arrays)


def _npz_case(name: str, message: str, **changes: np.ndarray) -> BadCase:
    return BadCase(
        "ingest",
        ("-S", f"data.source=inputs/{name}.npz"),
        message,
        lambda project: _npz(project, name, **changes),
    )


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda project: (project / name).write_bytes(content)


def _shipped_params() -> bytes:
    return (REPO / "params.yaml").read_bytes()


# No CUDA here: plain `cuda` is refused; on a GPU host, the index past its last device is.
def _absent_cuda_device() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


BAD_CASES = {
    "image size not a multiple of 32": BadCase(
        "ingest", ("-S", "data.image_size=100"), "data.image_size must be a multiple of 32"
    ),
    "image size above the ceiling": BadCase(
        "ingest", ("-S", "data.image_size=100000"), "data.image_size must be at most 1024"
    ),
    "zero epochs": BadCase("train", ("-S", "train.epochs=0"), "train.epochs must be at least 1"),
    "a CUDA device the host lacks": BadCase(
        "train", ("-S", "train.device=" + _absent_cuda_device()), "train.device=cuda"
    ),
    "a misspelt key": BadCase("train", ("-S", "train.epocs=3"), "Unknown parameter 'train.epocs'"),
    "labels shorter than images": _npz_case(
        "short", "val_labels holds 3 labels but val_images holds 4", val_labels=np.zeros((3, 1))
    ),
    "labels longer than images": _npz_case(
        "long",
        "train_labels holds 9 labels but train_images holds 8",
        train_labels=np.zeros((9, 1), dtype=np.int64),
    ),
    "an object array": _npz_case(
        "objects",
        "train_labels is an array of Python objects",
        train_labels=np.array([[i % 2] for i in range(8)], dtype=object),
    ),
    "empty arrays": _npz_case(
        "empty",
        "test_images is empty",
        test_images=np.zeros((0, 28, 28), dtype=np.uint8),
        test_labels=np.zeros((0, 1), dtype=np.int64),
    ),
    "4-D images": _npz_case(
        "volumes",
        "train_images has shape (8, 28, 28, 28)",
        train_images=np.zeros((8, 28, 28, 28), dtype=np.uint8),
    ),
    "non-integer labels": _npz_case(
        "fractions",
        "train_labels[1] is 0.5",
        train_labels=np.array([0, 0.5, 1, 0, 1, 0, 1, 0]).reshape(8, 1),
    ),
    "text labels": _npz_case(
        "words", "labels must be integer class numbers", train_labels=np.array(list("abababab"))
    ),
    "float images": _npz_case(
        "floats", "train_images holds float64 values", train_images=np.zeros((8, 28, 28))
    ),
    "a .npz that is not an archive": BadCase(
        "ingest",
        ("-S", "data.source=inputs/garbage.npz"),
        "is not a readable .npz archive",
        lambda project: (
            (project / "inputs").mkdir(exist_ok=True)
            or (project / "inputs/garbage.npz").write_bytes(b"not a zip")
        ),
    ),
    "a YAML syntax error": BadCase(
        "ingest",
        ("--params", "broken.yaml"),
        "broken.yaml is not valid YAML",
        _write("broken.yaml", b"seed: 42\ndata: [unclosed\n"),
    ),
    "a params file that is not UTF-8": BadCase(
        "train",
        ("--params", "latin1.yaml"),
        "latin1.yaml is not UTF-8 text",
        lambda project: (project / "latin1.yaml").write_bytes(
            b"# caf\xe9\n" + (project / "params.yaml").read_bytes()
        ),
    ),
}

# Small enough that the good first ingest takes seconds.
TINY = {
    ("synthetic", "n_patients"): 8,
    ("synthetic", "size"): 64,
    ("data", "image_size"): 32,
    ("data", "workers"): 1,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with a copy of params.yaml (tiny sizes; every path relative, so inside
    the folder), a processed dataset from a first good ``medtransfer ingest``, and a models/
    folder with files in it."""
    root = tmp_path_factory.mktemp("project")
    params = yaml.safe_load(_shipped_params())
    for (section, key), value in TINY.items():
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _medtransfer(root, "ingest")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("student/weights.pt", "student/strategies/partial/weights.pt"):
        (root / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "models" / name).write_bytes(name.encode())
    return root


def _medtransfer(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the installed ``medtransfer`` command in ``project``; output captured as text."""
    command = shutil.which("medtransfer", path=str(Path(sys.executable).parent))
    assert command, "the medtransfer console script is not installed next to this Python"
    env = {
        **os.environ,
        "MEDTRANSFER_PATIENT_SALT": "test-salt",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "PYTHONWARNINGS": "ignore",  # a library's deprecation notice is not ours to count
    }
    return subprocess.run(
        [command, *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outputs_digest(project: Path) -> dict[str, str]:
    """SHA-256 of every file under data/processed, data/processed.staging and models/."""
    digest = {}
    for folder in ("data/processed", "data/processed.staging", "models"):
        for path in sorted((project / folder).rglob("*")):
            if path.is_file():
                key = path.relative_to(project).as_posix()
                digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@pytest.mark.parametrize("case", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_a_bad_value_is_one_line_and_exit_status_2_and_touches_no_output(
    project: Path, case: BadCase
) -> None:
    if case.setup is not None:
        case.setup(project)
    before = _outputs_digest(project)
    assert any(key.startswith("data/processed/") for key in before)

    done = _medtransfer(project, case.command, "-q", *case.args)

    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"medtransfer {case.command}: error: ")
    assert case.message in lines[0]
    assert _outputs_digest(project) == before
    assert not (project / "data/processed.staging").exists()
