"""Shared fixtures: parameters pointed at a temporary folder, and small DICOM builders."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tasks.config import Params, load_params

REPO = Path(__file__).resolve().parent.parent
# `make test` runs two pytest-xdist workers on CI's two cores: one torch thread each, as two
# threads per worker would ask four of two cores (and subprocesses inherit the setting).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Prefect's state for this test session: a home of its own, neither the user's ~/.prefect nor
# the checkout's .prefect/ (which flows/environment.py picks for runs from a checkout).
_PREFECT_HOME = tempfile.mkdtemp(prefix="medtransfer-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, ``kill``) ends the session as Ctrl-C does, so that fixtures
    still stop the servers they started (PostgreSQL, MLflow, Orthanc, Dask, ``bentoml
    serve``) instead of leaving them running without a parent."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent when it is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``make test``'s scheduling on two workers: a test module, or a folder of modules that
    share session fixtures (``tests/deploy``: trained and served students; ``tests/scale``:
    PostgreSQL, an MLflow server, a Dask cluster), runs whole on one worker, so each fixture
    is built once and each module's tests keep their order."""
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]  # tests/deploy/test_x.py, tests/test_y.py
            parts = module.split("/")
            return "/".join(parts[:2]) if len(parts) > 2 else module

    return FolderScheduling(config, log)


@pytest.fixture(autouse=True)
def _stage_loggers_as_found() -> Iterator[None]:
    """Undo the command line's logging set-up after a test that ran ``flows.cli.main`` in this
    process: it stops ``tasks.*``/``medtransfer.*`` lines from propagating (so that a terminal
    shows each once), which would hide them from later tests' ``caplog``."""
    yield
    from tasks.training.recorders import TqdmLoggingHandler

    for name in ("tasks", "medtransfer"):
        logger = logging.getLogger(name)
        logger.propagate = True
        for handler in [h for h in logger.handlers if isinstance(h, TqdmLoggingHandler)]:
            logger.removeHandler(handler)


# What a test run may leave in the checkout: caches and the screenshots tests/artifacts/ keeps
# for a person (all ignored by .gitignore). Anything else a run adds or changes fails it.
RUN_LEFTOVERS = ("__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                 ".import_linter_cache", "tests/artifacts/")  # fmt: skip


def _checkout_state() -> dict[str, str] | None:
    """Every path ``git status`` reports (ignored and untracked files included, one by one)
    mapped to its status, size and modification time; None outside a git checkout (a copied
    tree, as ``benchmarks/mutation.py`` runs the tests in)."""
    try:
        listed = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "-z"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    state = {}
    for entry in filter(None, listed.split("\0")):
        status, path = entry[:2], entry[3:]
        if any(part in path for part in RUN_LEFTOVERS) or path.startswith(".venv"):
            continue
        try:  # size and mtime, not a hash: an ignored data/ folder may hold gigabytes
            stat = (REPO / path).stat()
            state[path] = f"{status} {stat.st_size} {stat.st_mtime_ns}"
        except OSError:
            state[path] = status
    return state


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_as_found() -> Iterator[None]:
    """Fail the session if its tests added, removed or changed a file in the checkout (e.g.
    ``data/.patient_salt`` or a Bento written beside the sources). Only changes made during
    the run count: a checkout that was already dirty is compared with itself."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    if before is None or after is None:
        return
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"the tests left the checkout changed: {changed[:20]}"


@pytest.fixture(autouse=True, scope="session")
def _isolated_salt() -> Iterator[None]:
    """A fixed patient salt, so tests never create data/.patient_salt in the repository.

    Session-scoped and autouse, so it is set before the session-scoped deploy fixtures
    ingest (a function-scoped monkeypatch came too late for them and they wrote the file).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDTRANSFER_PATIENT_SALT", "test-salt")
        yield


@pytest.fixture
def params(tmp_path: Path) -> dict:
    """The repository's params.yaml with every path inside ``tmp_path`` and a small data set."""
    return params_in(tmp_path)


def params_in(root: Path) -> Params:
    """The repository's params.yaml with every path inside ``root`` and a small data set."""
    return load_params(
        REPO / "params.yaml",
        [
            # the shorthand and sub-folder labels: the shipped data.source and labels_csv name
            # the synthetic set's folder and its CSV inside the project
            "data.source=synthetic",
            "data.labels_csv=null",
            f"data.processed_dir={root / 'processed'}",
            f"reports_dir={root / 'reports'}",
            f"synthetic.output_dir={root / 'synthetic'}",
            "synthetic.n_patients=16",
            "synthetic.size=64",
            "data.image_size=32",
            # a fixed teacher and strategy, cheaper than the shipped full fine-tune; the tests
            # of auto ask for it
            "train.teacher=efficientnet-lite0",
            "train.strategy=partial",
        ],
    )


def make_mono_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_id: str = "PID-1",
    sop_uid: str | None = None,
    **attributes: object,
) -> Dataset:
    """A minimal valid grayscale DICOM dataset around ``pixels`` (2-D, or 3-D multi-frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = uid
    ds.Modality = "CR"
    ds.PatientID = patient_id
    ds.PatientName = "TEST^PATIENT"
    ds.set_pixel_data(
        pixels,
        photometric_interpretation=photometric,
        bits_stored=bits_stored,
        generate_instance_uid=False,
    )
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test harness: a temporary local API server and SQLite database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def params_file(params: Params, tmp_path: Path) -> Path:
    """``params`` written to a YAML file, for the CLI, DVC and the Prefect flow."""
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite MLflow store that MLflow created and migrated, with nothing logged yet.

    Creating one runs MLflow's schema migrations, about 3 s; tests copy this file instead.
    """
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


@contextmanager
def mlflow_store_in(root: Path, empty_db: Path) -> Iterator[str]:
    """A fresh MLflow store in ``root`` (a copy of ``empty_db``, the migrated empty store) set
    through the environment as a user would, for the block; yields its tracking URI."""
    import mlflow

    shutil.copy(empty_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MEDTRANSFER_ARTIFACT_ROOT", str(root / "mlartifacts"))
        yield uri
    # A stage of the block pointed MLflow's process-wide URI here (configure_mlflow): point it
    # back, or a later test's MlflowClient() would read this store.
    mlflow.set_tracking_uri(before)


@pytest.fixture
def fresh_mlflow_store(empty_mlflow_db: Path, tmp_path: Path) -> Iterator[str]:
    """A fresh MLflow store in ``tmp_path`` for this test; returns its tracking URI."""
    with mlflow_store_in(tmp_path, empty_mlflow_db) as uri:
        yield uri


def model_card_of(**fields: object) -> str:
    """The model card of a minimal registration (model ``m`` version 1 of run ``r``, classes
    ``a`` and ``b``, dataset ``d``, no reports, not promoted, alias ``champion``) with
    ``fields`` of :class:`~tasks.registry.model_card.CardInputs` in their place."""
    from tasks.registry.model_card import CardInputs, render_model_card

    minimal = {
        "model_name": "m",
        "version": "1",
        "run_id": "r",
        "spec": {"classes": ["a", "b"]},
        "dataset_version": "d",
        "ingest": {},
        "metrics": {},
        "robustness": None,
        "promoted": False,
        "alias": "champion",
    }
    return render_model_card(CardInputs(**(minimal | fields)))


def outputs_in(root: Path) -> list[str]:
    """Overrides that put the student, its checkpoints, the BentoML home, the exported Bentos
    and the monitor's store inside ``root`` (beside ``params_in``'s data and reports)."""
    return [
        f"train.model_dir={root / 'models/student'}",
        f"train.checkpoint_dir={root / 'models/checkpoints'}",
        f"serving.bentoml_home={root / 'bentoml'}",
        f"serving.export_dir={root / 'bentos'}",
        f"serving.monitor_store={root / 'monitor.sqlite'}",
    ]


# The small training set of ``train_params``: its data settings and the folders it fills.
SMALL_TRAINING_SET = ["synthetic.n_patients=24", "data.image_size=64"]
SMALL_TRAINING_FOLDERS = ("synthetic", "processed", "reports")


@pytest.fixture(scope="session")
def small_training_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic set generated and ingested once per session (about 40 tests train
    on it); ``train_params`` copies its folders instead of generating and ingesting again."""
    from tasks.stages.ingest import run_ingest

    root = tmp_path_factory.mktemp("small-training-set")
    run_ingest(params_in(root).with_overrides(SMALL_TRAINING_SET), progress=False)
    return root


@pytest.fixture
def train_params(
    params: Params, tmp_path: Path, fresh_mlflow_store: str, small_training_set: Path
) -> dict:
    """Small synthetic data at 64 px (ingested: a copy of the session's), a temporary MLflow
    store and model folders."""
    small = params.with_overrides(small_training_overrides(tmp_path))
    for folder in SMALL_TRAINING_FOLDERS:
        shutil.copytree(small_training_set / folder, tmp_path / folder)
    return small


def small_training_overrides(root: Path) -> list[str]:
    """``train_params``' settings over ``params_in(root)``: the small set, two linear-probe
    epochs, model, Bento and export folders inside ``root``."""
    return [
        *SMALL_TRAINING_SET,
        "train.epochs=2",
        "train.batch_size=16",
        "train.strategy=linear_probe",
        f"train.model_dir={root / 'models/student'}",
        f"train.checkpoint_dir={root / 'models/checkpoints'}",
        "eval.gradcam_examples=2",
        f"serving.bentoml_home={root / 'bentoml'}",
        f"serving.export_dir={root / 'bentos'}",
    ]


def copy_trained_project(source: Path, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy a project trained once in ``source`` (its data, reports, models, ``mlflow.db`` and
    ``mlartifacts``) into ``target`` and point this test's MLflow at the copy, so that a test can
    run later stages on it without training again and without touching the original or another
    test's copy. The store's artifact locations name ``source``; they are rewritten to ``target``
    in every text column of the copied SQLite file (MLflow keeps no other absolute path)."""
    import sqlite3

    shutil.copytree(source, target, dirs_exist_ok=True)
    database = target / "mlflow.db"
    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master "
                                                        "WHERE type = 'table'")]  # fmt: skip
        for table in tables:
            for column in connection.execute(f'PRAGMA table_info("{table}")').fetchall():
                if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                    connection.execute(
                        f'UPDATE "{table}" SET "{column[1]}" = '
                        f'replace("{column[1]}", ?, ?) WHERE instr("{column[1]}", ?) > 0',
                        (str(source), str(target), str(source)),
                    )
    connection.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.setenv("MEDTRANSFER_ARTIFACT_ROOT", str(target / "mlartifacts"))
