"""Screenshots of the MLflow UI after a small finished `medtransfer run`: a run's robustness
curves (one chart per attack, the budget as its step) and the runs list with the test AUC and
the robustness verdict as columns. Saved as PNG under ``benchmarks/results/``.

Runs ``medtransfer run`` at test size in a fresh working folder (its own SQLite store and
Prefect home), starts ``mlflow ui`` on a free loopback port, drives Debian's Chromium
(``make browser``) with Playwright, and stops the server by its PID.

Usage: ``python -m benchmarks.mlflow_screenshot [--workdir /tmp/medtransfer-mlflow-shot]
[--reuse]`` (``--reuse``: keep a finished run already in the folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from benchmarks.report import RESULTS_DIR

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("MEDTRANSFER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
ML_VIEW = "workflowType=machine_learning"  # MLflow 3's switch to the model-training view
# Test size: a few minutes on 2 CPU cores; gates off (a 2-epoch student is not the point).
TINY = [
    "synthetic.n_patients=24",
    "synthetic.size=64",
    "data.image_size=32",
    "train.epochs=2",
    "robustness.max_samples=24",
    "robustness.epsilons_255=[0.5,1,2,4]",
    "robustness.pgd_steps=1",
    "robustness.apgd_steps=2",
    "robustness.universal_images=2",
    "robustness.universal_steps=1",
    "robustness.reference_probe=false",
    "robustness.square_max_samples=0",
]


def run_tiny_pipeline(workdir: Path) -> None:
    """``medtransfer run`` on the project's params.yaml with :data:`TINY` in ``workdir``."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    overrides = [arg for item in TINY for arg in ("-S", item)]
    medtransfer = Path(sys.executable).parent / "medtransfer"
    subprocess.run([str(medtransfer), "run", "-q", *overrides], cwd=workdir, env=env, check=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow ui not healthy after {seconds} s")


def _ids(store: str) -> tuple[str, str, str]:
    """The experiment, the training run (the one with the robustness verdict) and its name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(
        yaml.safe_load((REPO / "params.yaml").read_text())["mlflow"]["experiment"]
    )
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.robustness_verdict != ''", max_results=1
    )
    return experiment.experiment_id, run.info.run_id, run.info.run_name


def shoot(base: str, experiment_id: str, run_id: str, run_name: str) -> list[Path]:
    """Open the run's charts, its robustness plot and the runs list in Chromium; returns the
    PNGs written."""
    from playwright.sync_api import sync_playwright

    run_page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(120_000)
            # the run's model metrics: one chart per attack, the budget (tenths of 1/255) as step
            page.goto(f"{run_page}/model-metrics?{ML_VIEW}")
            page.get_by_text("teacher_mimicry_success").first.wait_for()
            _close_assistant(page)
            page.get_by_placeholder("Search").first.fill("robustness/")
            page.wait_for_timeout(4000)
            shots.append(_save(page, "mlflow-robustness-curves.png"))
            # the same figures with their 95% intervals as bands: the run's robustness plot
            page.goto(f"{run_page}/artifacts/robustness/robustness.png?{ML_VIEW}")
            page.wait_for_timeout(6000)
            shots.append(_save(page, "mlflow-robustness-bands.png"))
            # the runs list with the test AUC and the verdict as columns
            page.set_viewport_size({"width": 1800, "height": 700})
            page.goto(f"{base}/#/experiments/{experiment_id}?{ML_VIEW}")
            page.get_by_text(run_name).first.wait_for()
            page.wait_for_timeout(3000)  # the assistant panel opens after the table
            _close_assistant(page)
            _show_columns(page, ["test_auc", "robustness_verdict"])
            shots.append(_save(page, "mlflow-runs-list.png"))
        finally:
            browser.close()
    return shots


def _show_columns(page, names: list[str]) -> None:
    """Tick ``names`` (the run tags ``test_auc`` and ``robustness_verdict``) in the runs
    table's column selector (MLflow 3.17 shows no metric or tag column until one is chosen);
    the tag is the last match of a search (after the metrics that contain its name)."""
    page.get_by_role("button", name="Columns").first.click()
    search = page.get_by_placeholder("Search columns")
    search.wait_for()
    selector = search.locator("xpath=ancestor::div[4]")
    for name in names:
        search.fill(name)
        page.wait_for_timeout(1500)
        selector.get_by_text(name).last.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(2000)
    shown = page.get_by_role("columnheader").all_inner_texts()
    missing = [name for name in names if name not in shown]
    if missing:
        raise RuntimeError(f"the runs list shows no {missing} column: {shown}")


def _close_assistant(page) -> None:
    """Close MLflow 3.17's assistant panel, which takes a third of the window."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def _save(page, name: str) -> Path:
    path = RESULTS_DIR / name
    page.screenshot(path=str(path), full_page=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medtransfer-mlflow-shot"))
    parser.add_argument("--reuse", action="store_true", help="keep a finished run there")
    args = parser.parse_args()
    if not (args.reuse and (args.workdir / "mlflow.db").is_file()):
        run_tiny_pipeline(args.workdir)
    store = f"sqlite:///{args.workdir / 'mlflow.db'}"
    experiment_id, run_id, run_name = _ids(store)
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1"]
    log = (args.workdir / "mlflow-ui.log").open("w")
    server = subprocess.Popen(
        [*command, "--port", str(port)], cwd=args.workdir, stdout=log, stderr=log,
        start_new_session=True,  # its workers too: stopped together, by the group of its PID
    )  # fmt: skip
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server, 180)
        for path in shoot(f"http://127.0.0.1:{port}", experiment_id, run_id, run_name):
            print(f"screenshot: {path} ({path.stat().st_size} bytes)")
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """Stop ``mlflow ui`` and its workers (its process group, by the server's PID)."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=90)  # its workers finish their requests first: slow when busy
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    main()
