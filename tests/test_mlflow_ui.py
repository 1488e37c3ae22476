"""What a person sees in the MLflow UI after a training: a real `mlflow ui`, real Chromium.

A tiny real training fills a temporary SQLite store; its model is registered as a version with
the alias ``champion`` (what the registry stage does in production). ``mlflow ui`` serves that
store on a loopback port and headless Chromium (Debian's ``chromium``, installed by
``make browser``), driven by Playwright, opens the experiment, the run and the registered
model. Screenshots go to ``tests/artifacts/`` for a person to look at.
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
def test_mlflow_ui_shows_experiment_run_metric_and_champion(
    train_params: Params, chromium: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    report = run_train(train_params.with_overrides(["train.epochs=1"]))
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(report["run_id"])
    auc = run.data.metrics["eval_test_auc"]
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(
        MODEL_NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    experiment = train_params.mlflow.experiment
    experiment_id = client.get_experiment_by_name(experiment).experiment_id

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

                # The experiment's runs: its name and the training run.
                page.goto(f"{base}/#/experiments/{experiment_id}/runs")
                expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible()
                expect(page.get_by_text(experiment, exact=True).first).to_be_visible()
                shoot("experiment")

                # The run: a metric with the value MLflow stored.
                page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
                row = page.get_by_role("row").filter(has_text="eval_test_auc").first
                expect(row).to_be_visible()
                shown = [
                    float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", row.inner_text())
                ]
                assert any(abs(x - auc) < 1e-6 for x in shown), (row.inner_text(), auc)
                row.scroll_into_view_if_needed()  # the metrics table sits below the fold
                shoot("run")

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
