"""The training and evaluation stages with the real teacher, a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.summary import summary_lines
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
    assert seen.epochs == [1, 2]  # epochs count from 1 in every output
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
        assert [m.step for m in history] == [1, 2], name
    # the history's plot data (what `dvc plots diff` overlays) is the run's per-epoch metrics
    plotted = json.loads((reports / "plots" / "train_history.json").read_text())
    assert [row["epoch"] for row in plotted] == [1, 2]
    assert {row["strategy"] for row in plotted} == {"linear_probe"}
    for name in ("train_loss", "val_loss", "val_auc"):
        logged = [m.value for m in _client().get_metric_history(report["run_id"], name)]
        assert [row[name] for row in plotted] == pytest.approx(logged), name
    assert "history" not in report and all("history" not in row for row in report["runs"])
    # the best epoch is the same number everywhere: the epoch (1-based) of the history's
    # first highest validation AUC, in the report, MLflow, the plot data and the summary
    aucs = [row["val_auc"] for row in plotted]
    best = aucs.index(max(aucs)) + 1
    assert report["best_epoch"] == best and run.data.metrics["best_epoch"] == best
    assert f"best epoch {best} of 2," in "\n".join(summary_lines({"train": report}))
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


def _torchrun_node(node_rank: int, port: int, params_file: Path) -> subprocess.Popen:
    """One "node" of ``torchrun --nnodes 2 --nproc_per_node 1``, meeting the other on loopback."""
    bin_dir = Path(sys.executable).parent
    return subprocess.Popen(
        [str(bin_dir / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(bin_dir / "medtransfer"), "train", "--params", str(params_file), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_torchrun_on_two_nodes_trains_the_one_process_student_and_rank_0_alone_logs(
    train_params: Params, tmp_path: Path
) -> None:
    """The README's multi-node line on CPU: two torchrun "nodes" of one process each (DDP on
    gloo over loopback), 8 images per rank, against one process with batches of 16: the same
    global batches (the sampler deals a permutation out to the ranks in turn) and averaged
    gradients. Not bit-equal (each rank draws its own augmentations, and rank 0 averages its
    training loss over its half alone), so the validation of the full set is compared: within
    0.05 of the one-process student's loss and AUC after an epoch (measured: 0.811 against
    0.791). One MLflow run, from rank 0."""
    from tests.processes import free_port

    single = train_params.with_overrides(["train.epochs=1", "train.batch_size=16"])
    alone = run_train(single)
    ddp_dir = tmp_path / "ddp"
    ddp = single.with_overrides(
        ["train.batch_size=8", f"reports_dir={ddp_dir / 'reports'}",
         f"train.model_dir={ddp_dir / 'student'}", f"train.checkpoint_dir={ddp_dir / 'ck'}"]
    )  # fmt: skip
    shutil.copytree(tmp_path / "reports", ddp_dir / "reports")  # ingest.json, as the stage needs
    params_file = tmp_path / "ddp.yaml"
    params_file.write_text(yaml.safe_dump(ddp.to_dict()))
    port = free_port()
    nodes = [_torchrun_node(rank, port, params_file) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    report = json.loads((ddp_dir / "reports/train.json").read_text())
    runs = _client().search_runs([_client().get_experiment_by_name("medtransfer").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([report["run_id"], alone["run_id"]])
    one, two = _validation(alone["run_id"]), _validation(report["run_id"])
    assert two == pytest.approx(one, abs=0.05), (one, two)
    assert sorted(p.name for p in (ddp_dir / "student").iterdir()) == sorted(
        p.name for p in Path(single.train.model_dir).iterdir()
    )


def _validation(run_id: str) -> list[float]:
    """The run's last validation loss and AUC, as logged to MLflow."""
    metrics = _client().get_run(run_id).data.metrics
    return [metrics["val_loss"], metrics["val_auc"]]
