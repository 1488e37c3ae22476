"""The training and evaluation stages with the real teacher, a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.stages.evaluate import run_evaluate
from tasks.stages.train import run_train


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


class _EpochsSeen:
    """A caller's recorder: notes the epochs it is told about."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        pass

    def epoch_ended(self, row: dict[str, float]) -> None:
        self.epochs.append(int(row["epoch"]))

    def fit_ended(self, result) -> None:
        pass


def test_train_then_evaluate_records_everything(train_params: Params) -> None:
    seen = _EpochsSeen()
    report = run_train(train_params, progress=False, recorders=[seen])
    assert seen.epochs == [0, 1]
    reports = Path(train_params.reports_dir)
    assert json.loads((reports / "train.json").read_text())["run_id"] == report["run_id"]

    run = _client().get_run(report["run_id"])
    assert run.data.params["train.strategy"] == "linear_probe"
    assert run.data.tags["dataset_version"].endswith(".dir")
    assert len(run.data.params["teacher.weights_sha256"]) == 64
    ingest = json.loads((reports / "ingest.json").read_text())
    assert run.data.metrics["ingest_files_seen"] == ingest["files_seen"]
    per_epoch = (
        "train_loss",
        "images_per_s",
        "val_loss",
        "val_auc",
        "val_accuracy",
        "lr",
        "seconds",
    )
    for name in per_epoch:
        history = _client().get_metric_history(report["run_id"], name)
        assert [m.step for m in history] == [0, 1], name
    # the history's plot data (what `dvc plots diff` overlays) is the run's per-epoch metrics
    plotted = json.loads((reports / "plots" / "train_history.json").read_text())
    assert [row["epoch"] for row in plotted] == [0, 1]
    assert {row["strategy"] for row in plotted} == {"linear_probe"}
    for name in ("train_loss", "val_loss", "val_auc"):
        logged = [m.value for m in _client().get_metric_history(report["run_id"], name)]
        assert [row[name] for row in plotted] == pytest.approx(logged), name
    assert "history" not in report and all("history" not in row for row in report["runs"])
    assert run.data.metrics["best_epoch"] == report["best_epoch"]
    assert run.data.metrics["best_val_auc"] == pytest.approx(report["best_val_auc"])
    # the logged model says what it is (MLflow's default name was "model")
    model = mlflow.pytorch.load_model(f"runs:/{report['run_id']}/student_classifier")
    assert model is not None
    logged = mlflow.models.get_model_info(f"runs:/{report['run_id']}/student_classifier")
    assert logged.signature is not None and logged.saved_input_example_info is not None

    metrics = run_evaluate(train_params)
    # the evaluate stage and training score the same student with the same code and seed
    assert metrics["test"]["auc"] == pytest.approx(report["runs"][0]["test_auc"], abs=1e-9)
    assert sum(map(sum, metrics["test"]["confusion"])) == ingest["splits"]["test"]["images"]
    for name in ("roc.png", "confusion_test.png", "gradcam_test.png"):
        assert (reports / "plots" / name).stat().st_size > 1000, name
    artifacts = {a.path for a in _client().list_artifacts(report["run_id"], "evaluation")}
    assert {
        "evaluation/roc.png",
        "evaluation/gradcam_test.png",
        "evaluation/metrics.json",
    } <= artifacts
    logged_metrics = _client().get_run(report["run_id"]).data.metrics
    assert "eval_test_auc" in logged_metrics
    _check_intervals_and_calibration(train_params, metrics, logged_metrics)


def _check_intervals_and_calibration(params: Params, metrics: dict, logged: dict) -> None:
    """metrics.json, MLflow and the served probabilities agree on intervals and calibration."""
    import numpy as np

    from tasks.data.dataset import load_processed
    from tasks.evaluation.metrics import apply_temperature
    from tasks.model.inference import Predictor
    from tasks.model.predict import probabilities

    test = metrics["test"]
    assert test["n_patients"] <= test["n_images"] == sum(map(sum, test["confusion"]))
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        low, high = test["ci95"][name]["low"], test["ci95"][name]["high"]
        assert low <= test[name] <= high, name
        assert logged[f"eval_test_{name}_ci_low"] == pytest.approx(low), name
    assert metrics["bootstrap"] == {
        "resamples": params.eval.bootstrap,
        "seed": 42,
        "unit": "patient",
    }
    # the temperature fitted here is the one saved with the student, which serving applies
    predictor = Predictor.from_folder(params.train.model_dir)
    temperature = metrics["calibration"]["temperature"]
    assert predictor.spec.temperature == pytest.approx(temperature)
    assert logged["eval_temperature"] == pytest.approx(temperature)
    dataset = load_processed(params.data.processed_dir)
    images, _ = dataset.subset("test")
    raw = probabilities(predictor.model, images)
    np.testing.assert_allclose(
        predictor.predict_images(images), apply_temperature(raw, temperature), atol=1e-5
    )
    plots = Path(params.reports_dir) / "plots"
    for name in ("roc_test.json", "confusion_test.json", "reliability_test.json"):
        assert json.loads((plots / name).read_text()), name
    assert (plots / "reliability_test.png").stat().st_size > 1000


def test_compare_and_label_fractions_nest_child_runs(train_params: Params) -> None:
    params = train_params.with_overrides(
        [
            "train.compare=[linear_probe,scratch]",
            "train.label_fractions=[0.5,1.0]",
            "train.epochs=1",
        ],
    )
    report = run_train(params)
    client = _client()
    parent = client.get_run(report["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted((c.data.tags["strategy"], c.data.tags["label_fraction"]) for c in children) == [
        ("linear_probe", "0.5"),
        ("linear_probe", "1.0"),
        ("scratch", "0.5"),
        ("scratch", "1.0"),
    ]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "data_efficiency.png" in artifacts and "comparison.json" in artifacts
    halves = [r for r in report["runs"] if r["fraction"] == 0.5]
    fulls = [r for r in report["runs"] if r["fraction"] == 1.0]
    assert all(h["n_train"] < f["n_train"] for h, f in zip(halves, fulls, strict=True))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.compare=[partial,finetune_all]", "Unknown strategy"),
        ("train.teacher=resnet-9000", "resnet-9000"),
        ("train.unfreeze_blocks=99", "unfreeze_blocks"),
    ],
)
def test_wrong_configuration_fails_before_training(
    train_params: Params, override: str, message: str
) -> None:
    with pytest.raises(MedtransferError, match=message):
        run_train(train_params.with_overrides([override]))
    assert not Path(train_params.train.model_dir).exists()


def test_missing_dataset_is_a_clear_error(train_params: Params, tmp_path: Path) -> None:
    with pytest.raises(MedtransferError, match="medtransfer ingest"):
        run_train(train_params.with_overrides([f"data.processed_dir={tmp_path / 'nothing'}"]))


def test_torchrun_two_cpu_processes(train_params: Params, tmp_path: Path) -> None:
    """The same command under torchrun: DDP on gloo, one MLflow run written by rank 0."""
    params_file = tmp_path / "ddp.yaml"
    params_file.write_text(
        yaml.safe_dump(train_params.with_overrides(["train.epochs=1"]).to_dict())
    )
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(bin_dir / "medtransfer"),
            "train",
            "--params",
            str(params_file),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((Path(train_params.reports_dir) / "train.json").read_text())
    runs = _client().search_runs([_client().get_experiment_by_name("medtransfer").experiment_id])
    assert [r.info.run_id for r in runs] == [report["run_id"]]  # rank 1 logged nothing
