"""What a person sees in the MLflow UI after a training: a real `mlflow ui`, real Chromium.

A tiny real training fills a temporary SQLite store; its model is registered as a version with
the alias ``champion`` (what the registry stage does in production). ``mlflow ui`` serves that
store on a loopback port and headless Chromium (Debian's ``chromium``, installed by
``make browser``), driven by Playwright, opens the experiment, the run and the registered
model. Screenshots go to ``tests/artifacts/`` for a person to look at.

What a new user must find: the experiment opening on its training runs (not MLflow's GenAI
overview), a run named after what it trained on, the run's dataset input with its digest (the
DVC version) and source, and the logged model's page showing the evaluation metrics.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.config import Params
from tasks.stages.train import run_train
from tests.processes import free_port, http_ok, running, wait_until

CHROMIUM = Path(os.environ.get("MEDTRANSFER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # no calls home: the machine reaches nothing but loopback
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MODEL_NAME = "medtransfer-student"
PAGE_TIMEOUT_MS = 60_000
ML_VIEW = "workflowType=machine_learning"  # the UI's switch between GenAI and model training


@pytest.fixture
def chromium() -> Path:
    """The browser binary; a missing one fails the test loudly instead of skipping it."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}. Run `make browser` (as root: "
            "`apt-get update && apt-get install -y chromium`), or point MEDTRANSFER_CHROMIUM "
            "at a Chromium binary.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.mark.slow
def test_mlflow_ui_shows_experiment_run_dataset_model_metrics_and_champion(
    train_params: Params, chromium: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tasks.tracking.configure import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, logged_model_id

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    report = run_train(train_params.with_overrides(["train.epochs=1"]))
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(report["run_id"])
    auc = run.data.metrics["eval_test_auc"]
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == report["dataset_version"][:36]
    assert dataset.source_type == "local" and "processed" in dataset.source
    model_id = logged_model_id(run.info.run_id)
    model_metrics = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    # linked to the model and to the dataset they were measured on
    assert model_metrics["eval_test_auc"].value == auc
    assert model_metrics["eval_test_auc"].dataset_digest == dataset.digest
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(
        MODEL_NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    experiment = client.get_experiment_by_name(train_params.mlflow.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    experiment_id = experiment.experiment_id
    # the run's name says what it trained: strategy, data set, dataset version, size
    strategy = train_params.train.strategy
    assert re.fullmatch(rf"{strategy} synthetic [0-9a-f]{{6}} n=\d+", run.info.run_name)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-ui.log"
    ui = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", tracking_uri]
    ARTIFACTS.mkdir(exist_ok=True)
    shots: list[Path] = []
    with running([*ui, "--host", "127.0.0.1", "--port", str(port)], log, os.environ) as server:
        wait_until(lambda: http_ok(f"{base}/health"), 120, "mlflow ui", server, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                # the first page loads the UI's scripts: slow on a busy 2-core machine
                expect.set_options(timeout=PAGE_TIMEOUT_MS)

                def shoot(name: str) -> None:
                    path = ARTIFACTS / f"mlflow_ui_{name}.png"
                    page.screenshot(path=str(path), full_page=True)
                    shots.append(path)

                # MLflow 3.17's UI lays an experiment out by the browser's "workflow type"
                # switch (GenAI by default), not by the experiment's kind tag: the links
                # medtransfer prints choose "machine learning", where the runs are.
                page.goto(f"{base}/#/experiments/{experiment_id}")
                page.wait_for_timeout(3000)
                shoot("experiment_default_view")
                page.goto(f"{base}/#/experiments/{experiment_id}?{ML_VIEW}")
                expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible()
                expect(page.get_by_text(experiment.name, exact=True).first).to_be_visible()
                shoot("experiment")

                # The run: a metric with the value MLflow stored, and its dataset input.
                page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}?{ML_VIEW}")
                row = page.get_by_role("row").filter(has_text="eval_test_auc").first
                expect(row).to_be_visible()
                assert _shows_number(row.inner_text(), auc), (row.inner_text(), auc)
                expect(page.get_by_text(dataset.name, exact=False).first).to_be_visible()
                expect(page.get_by_text(dataset.digest[:6], exact=False).first).to_be_visible()
                shoot("run")

                # The logged model's page: the evaluation metrics linked to it.
                page.goto(f"{base}/#/experiments/{experiment_id}/models/{model_id}?{ML_VIEW}")
                row = page.get_by_role("row").filter(has_text="eval_test_auc").first
                expect(row).to_be_visible()
                assert _shows_number(row.inner_text(), auc), (row.inner_text(), auc)
                assert dataset.name in row.inner_text()  # the metric's dataset column
                row.scroll_into_view_if_needed()  # the metrics table sits below the fold
                shoot("logged_model")

                # The registered model: its version carries the alias champion.
                page.goto(f"{base}/#/models/{MODEL_NAME}")
                expect(page.get_by_text("champion").first).to_be_visible()
                expect(page.get_by_text(f"Version {version.version}").first).to_be_visible()
                # A "try the new registry UI" dialog may cover the table on a first visit.
                page.keyboard.press("Escape")
                shoot("registered_model")
            finally:
                browser.close()
    for path in shots:
        assert path.stat().st_size > 10_000, path
        print(f"screenshot: {path}")


def _shows_number(text: str, value: float) -> bool:
    """Whether ``text`` shows ``value`` (to the digits the UI prints, at least 3)."""
    shown = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]
    return any(abs(x - value) < 1e-3 for x in shown)
