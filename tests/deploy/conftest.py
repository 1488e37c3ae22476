"""Fixtures of the registry and serving tests: a temporary MLflow store, logged students, and a
real ``bentoml serve`` of a packaged, exported and re-imported Bento on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tests.deploy.students import (
    SERVED_TEMPERATURE,
    LoggedStudent,
    log_student,
    stage_params,
    write_reports,
)
from tests.processes import free_port, stop_server_tree

BIN = Path(sys.executable).parent
# Limits of the served Bento, small so that the tests can exceed them cheaply.
SERVED_LIMITS = {
    "serving.max_upload_bytes": 1024 * 1024,
    "serving.max_image_dim": 1024,
    "serving.max_batch_files": 4,
    "serving.max_batch_size": 8,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """In-process predictions on one thread: on a busy 2-core machine two OpenMP threads
    spin against each other (and against the server under test) and run 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite MLflow store and artifact folder for the whole session (via the environment)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDTRANSFER_ARTIFACT_ROOT", str(root / "mlartifacts"))
        # the process-wide URI too (it also sets the environment): a module this worker ran
        # before may have left its own store there for MlflowClient() to read
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        yield root
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="session")
def students(mlflow_store: Path) -> dict[str, LoggedStudent]:
    """Two logged students: ``a`` trained on dataset-a and saved with temperature
    :data:`SERVED_TEMPERATURE` (it is the served one), ``b`` on dataset-b with none (T = 1)."""
    return {
        "a": log_student(
            mlflow_store, seed=0, dataset_version="dataset-a", temperature=SERVED_TEMPERATURE
        ),
        "b": log_student(mlflow_store, seed=1, dataset_version="dataset-b"),
    }


@dataclass(frozen=True)
class TrainingData:
    """The processed dataset the served Bento's profile is fit on, and its source folder."""

    source: Path
    processed: Path
    labels_csv: Path


@pytest.fixture(scope="session")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    """A small synthetic set (multi-frame files included) plus the pydicom corpus images the
    serving tests send, ingested at the students' 64 px: the served model's training data, so
    that its scope covers the corpus' modalities and its OOD threshold is set on validation."""
    import csv
    import shutil

    from pydicom.data import get_testdata_file

    from tasks.config import load_params
    from tasks.data import synthetic
    from tasks.stages.ingest import run_ingest
    from tests.deploy.samples import GOOD_DICOM
    from tests.deploy.students import REPO

    root = tmp_path_factory.mktemp("training-data")
    params = load_params(
        REPO / "params.yaml",
        [
            f"synthetic.output_dir={root / 'synthetic'}",
            "synthetic.n_patients=16",
            "synthetic.size=128",
            "synthetic.multiframe_fraction=0.3",
            f"data.processed_dir={root / 'processed'}",
            "data.image_size=64",
            # the served students are gray; the corpus' colour files are made luma, as a
            # gray model's service takes colour uploads (channels auto would make all colour)
            "data.channels=gray",
            "data.workers=1",
            f"reports_dir={root / 'reports'}",
        ],
    )
    generated, _ = synthetic.generate(synthetic.SyntheticConfig.from_params(params))
    # A copy: ingesting the synthetic folder itself would regenerate it (a changed set).
    source = root / "mixed"
    shutil.copytree(generated, source)
    labels_csv = source / synthetic.LABELS_FILE
    with open(labels_csv, "a", newline="") as handle:
        writer = csv.writer(handle)
        for index, name in enumerate(GOOD_DICOM):
            (source / "corpus").mkdir(exist_ok=True)
            shutil.copyfile(get_testdata_file(name), source / "corpus" / name)
            writer.writerow([f"corpus/{name}", synthetic.LABEL_NAMES[index % 2]])
    overrides = [f"data.source={source}", f"data.labels_csv={labels_csv}"]
    run_ingest(params.with_overrides(overrides), progress=False)
    return TrainingData(source, root / "processed", labels_csv)


@dataclass(frozen=True)
class Served:
    """A running ``bentoml serve``: its URL, log file, package report and the student it serves."""

    url: str
    log: Path
    package: dict
    student: LoggedStudent
    pid: int
    home: Path
    training: TrainingData
    monitor_store: Path
    params_file: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def run_checked(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run a command; on failure show its output in the assertion."""
    # 900 s: packaging took over 300 s on a shared 2-core machine under load (idle: about 30 s).
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def start_server(
    bento: str, home: Path, log: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    """``bentoml serve <bento>`` on a free loopback port, in its own process group."""
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "BENTOML_HOME": str(home)},
        cwd=home,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as one below
    )
    handle.close()
    return process, f"http://127.0.0.1:{port}"


def post_png_to_bento(bento: str, home: Path, png: bytes, log: Path):
    """``bentoml serve`` ``bento`` (from the store in ``home``) on loopback, post ``png`` to
    ``/classify/png``, stop the server by its process group; the ``requests.Response``."""
    import requests

    from tests.processes import stop_server_tree

    process, url = start_server(bento, home, log, dict(os.environ))
    try:
        wait_ready(process, url, log)
        return requests.post(
            f"{url}/classify/png", data=png, headers={"Content-Type": "image/png"}, timeout=60
        )
    finally:
        stop_server_tree(process)


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited early:\n{log.read_text()[-5000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"bentoml serve not ready after {timeout} s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="session")
def served(
    tmp_path_factory: pytest.TempPathFactory, students, training_data: TrainingData
) -> Iterator[Served]:
    """Student ``a`` registered, packaged by the CLI, exported, imported into a fresh BentoML
    home (the archive must stand alone) and served by ``bentoml serve`` on loopback."""
    from tasks.stages.register import run_register

    root = tmp_path_factory.mktemp("served")
    student = students["a"]
    overrides = [f"{k}={v}" for k, v in SERVED_LIMITS.items()]
    overrides.append(f"data.processed_dir={training_data.processed}")
    # The scope gate reads the source files' headers from the folder data.source names.
    overrides.append(f"data.source={training_data.source}")
    overrides.append(f"serving.monitor_store={root / 'monitor' / 'requests.sqlite'}")
    params = stage_params(root, student, ["registry.model_name=served-student", *overrides])
    write_reports(params, student, threshold=0.5)
    run_register(params)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    env["BENTOML_HOME"] = str(root / "build-home")
    package = json.loads(
        run_checked(
            [str(BIN / "medtransfer"), "package", "--json", "--params", str(params_file)], env, root
        )
    )
    serve_home = root / "serve-home"
    serve_home.mkdir()
    run_checked(
        [str(BIN / "bentoml"), "import", package["archive"]],
        {**env, "BENTOML_HOME": str(serve_home)},
        root,
    )
    log = root / "server.log"
    process, url = start_server(package["bento"], serve_home, log, env)
    try:
        wait_ready(process, url, log)
        yield Served(
            url=url,
            log=log,
            package=package,
            student=student,
            pid=process.pid,
            home=serve_home,
            monitor_store=root / "monitor" / "requests.sqlite",
            params_file=params_file,
            training=training_data,
        )
    finally:
        stop_server_tree(process)
