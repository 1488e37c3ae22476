"""Honest run records: a training that fails, is stopped or is killed says so in MLflow, and a
resumed training continues its own run. Real MLflow (a temporary SQLite store), real
``medtransfer train`` processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import Params
from tasks.stages.train import run_train

MEDTRANSFER = Path(sys.executable).parent / "medtransfer"


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def _runs() -> list[Run]:
    experiment = _client().get_experiment_by_name("medtransfer")
    return _client().search_runs([experiment.experiment_id]) if experiment else []


def _models_of(run_id: str) -> list:
    experiment = _client().get_experiment_by_name("medtransfer")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )


def _steps(run_id: str, metric: str = "train_loss") -> list[int]:
    return [m.step for m in _client().get_metric_history(run_id, metric)]


def _params_file(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


class _Raises:
    """A caller's recorder that raises ``error`` when the first epoch ends."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        pass

    def epoch_ended(self, row: dict[str, float]) -> None:
        raise self.error

    def fit_ended(self, result) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("disk on fire"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
)
def test_a_training_that_raises_ends_its_run_failed_or_killed_with_no_model(
    train_params: Params, error: BaseException, status: str
) -> None:
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(type(error)):
        run_train(train_params, progress=False, recorders=[_Raises(error)])
    [run] = _runs()
    assert run.info.status == status
    assert _steps(run.info.run_id) == [1]  # the epoch before the fault is on record
    assert _models_of(run.info.run_id) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_before  # the stage put it back


def _start_training(params_file: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(MEDTRANSFER), "train", "--params", str(params_file), "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_first_checkpoint(process: subprocess.Popen, checkpoints: Path) -> Path:
    """Block until the training has checkpointed an epoch; returns its checkpoint folder."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list(checkpoints.glob("*/last.pt"))
        if found:
            return found[0].parent
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint: {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint within 300 s")


def test_sigterm_mid_training_ends_the_run_killed(train_params: Params, tmp_path: Path) -> None:
    params_file = _params_file(
        train_params.with_overrides(["train.epochs=40"]), tmp_path / "p.yaml"
    )
    process = _start_training(params_file)
    _wait_for_first_checkpoint(process, Path(train_params.train.checkpoint_dir))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "medtransfer train: stopped by signal SIGTERM"
    [run] = _runs()
    assert run.info.status == "KILLED"
    assert 1 <= len(_steps(run.info.run_id)) < 40
    assert _models_of(run.info.run_id) == []


def test_after_sigkill_resume_closes_the_stale_run_and_continues_it_over_every_epoch(
    train_params: Params, tmp_path: Path
) -> None:
    epochs = 4
    params_file = _params_file(
        train_params.with_overrides([f"train.epochs={epochs}"]), tmp_path / "p.yaml"
    )
    process = _start_training(params_file)
    _wait_for_first_checkpoint(process, Path(train_params.train.checkpoint_dir))
    process.kill()  # SIGKILL: nothing in the process runs any more
    process.communicate(timeout=60)
    [killed] = _runs()
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves, and what must not stay
    killed_id = killed.info.run_id

    resumed = _start_training(params_file, "--resume")
    _, stderr = resumed.communicate(timeout=600)

    assert resumed.returncode == 0, stderr[-3000:]
    assert f"closed stale MLflow run {killed_id} as KILLED" in stderr
    [run] = _runs()  # the same run, continued: no second one
    assert run.info.run_id == killed_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["medtransfer.continued"] == "true"
    for metric in ("train_loss", "val_auc", "lr"):
        assert _steps(killed_id, metric) == list(range(1, epochs + 1)), metric
    assert len(_models_of(killed_id)) == 1


def test_resume_with_a_changed_parameter_names_it_unless_forced(
    train_params: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = _params_file(train_params.with_overrides(["train.epochs=1"]), tmp_path / "p.yaml")
    assert main(["train", "--params", str(params_file), "-q"]) == 0
    [first] = _runs()
    capsys.readouterr()

    more_epochs = ["--params", str(params_file), "-q", "-S", "train.epochs=2"]
    assert main(["train", *more_epochs, "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train.epochs (1 -> 2)" in error[0], error
    assert "--resume=force" in error[0]
    assert len(_runs()) == 1  # refused before any run started

    assert main(["train", *more_epochs, "--resume=force", "--json"]) == 0
    forced = next(r for r in _runs() if r.info.run_id != first.info.run_id)
    assert forced.info.status == "FINISHED"
    assert forced.data.tags["medtransfer.continues_run"] == first.info.run_id
    assert forced.data.params["train.epochs"] == "2"
    assert _steps(forced.info.run_id) == [1, 2]  # epoch 1 from the checkpoint, then epoch 2
    assert _steps(first.info.run_id) == [1]  # the continued run's record is untouched


def test_the_flow_resume_starts_afresh_without_a_word_when_parameters_changed(
    train_params: Params,
) -> None:
    run_train(train_params.with_overrides(["train.epochs=1"]), progress=False)
    report = run_train(train_params, resume=True, progress=False)
    assert report["resumed_from_epoch"] is None
    assert _steps(report["run_id"]) == [1, 2]
    assert "medtransfer.continues_run" not in _client().get_run(report["run_id"]).data.tags


class _StopsSecondFit:
    """A caller's recorder that presses Ctrl-C when the second training's first epoch ends."""

    def __init__(self) -> None:
        self.fits = 0

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        self.fits += 1

    def epoch_ended(self, row: dict[str, float]) -> None:
        if self.fits == 2:
            raise KeyboardInterrupt

    def fit_ended(self, result) -> None:
        pass


def test_a_stopped_comparison_ends_killed_and_resume_continues_its_parent_and_child(
    train_params: Params,
) -> None:
    params = train_params.with_overrides(["train.compare=[linear_probe,scratch]"])
    with pytest.raises(KeyboardInterrupt):
        run_train(params, progress=False, recorders=[_StopsSecondFit()])
    statuses = {r.data.tags.get("variant", "parent"): r.info.status for r in _runs()}
    assert statuses == {"parent": "KILLED", "linear_probe": "FINISHED", "scratch": "KILLED"}
    stopped = {r.data.tags.get("variant", "parent"): r.info.run_id for r in _runs()}

    report = run_train(params, resume=True, progress=False)

    assert report["parent_run_id"] == stopped["parent"]
    scratch = next(r for r in report["runs"] if r["strategy"] == "scratch")
    assert scratch["run_id"] == stopped["scratch"]
    assert _steps(stopped["scratch"]) == [1, 2]
    runs = {r.info.run_id: r for r in _runs()}
    assert runs[stopped["parent"]].info.status == "FINISHED"
    assert runs[stopped["scratch"]].data.tags["mlflow.parentRunId"] == stopped["parent"]
    # The finished child keeps its run; its checkpoint is re-evaluated in a linked new one.
    probe = next(r for r in report["runs"] if r["strategy"] == "linear_probe")
    assert runs[probe["run_id"]].data.tags["medtransfer.continues_run"] == stopped["linear_probe"]


def test_a_sigterm_during_a_store_write_is_raised_right_after_it_not_inside() -> None:
    """An exception in the middle of a SQLite write can leave its transaction open, and then
    the run cannot be ended KILLED (`database is locked`): the stop waits for the write."""
    import os
    import signal

    from tasks.signals import Terminated, sigterm_deferred, sigterm_raises

    finished = []
    with pytest.raises(Terminated), sigterm_raises():
        with sigterm_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes: give it the chance
                pass
            finished.append("write")
        finished.append("after")
    assert finished == ["write"]
