"""Three classes end to end: a 3-class set is ingested, trained, evaluated per class, attacked,
registered and served, and every stage speaks of all three classes.

One small MedMNIST-layout ``.npz`` (:func:`tasks.data.synthetic.write_three_class_npz`: normal,
an opacity on the left, an opacity on the right) goes through the real stages in this process, then
``bentoml serve`` of the packaged Bento on loopback answers for every class.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score, roc_auc_score

from tasks.data.synthetic import write_three_class_npz
from tests.conftest import params_in
from tests.deploy.conftest import start_server, wait_ready
from tests.deploy.samples import png_bytes
from tests.processes import stop_server_tree

CLASSES = ["0", "1", "2"]  # a MedMNIST archive's classes are its label values
SIZE = 32
SPLIT_SIZES = {"train": 45, "val": 21, "test": 21}


@dataclass(frozen=True)
class ThreeClassRun:
    """The stages' reports of the 3-class run, its MLflow run and the served Bento's URL."""

    root: Path
    train: dict
    metrics: dict
    robustness: dict
    register: dict
    url: str
    tracking_uri: str


@pytest.fixture(scope="module")
def three_class_run(
    tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path
) -> Iterator[ThreeClassRun]:
    """Ingest, train (linear probe, 2 epochs), evaluate, attack (tiny budgets), register
    (gates that a tiny model passes) and package the 3-class set, then serve the Bento."""
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.package import run_package
    from tasks.stages.register import run_register
    from tasks.stages.robustness import run_robustness
    from tasks.stages.train import run_train

    root = tmp_path_factory.mktemp("three-classes")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = params_in(root).with_overrides(
        [
            f"data.source={write_three_class_npz(root / 'three.npz', SPLIT_SIZES, SIZE, 7)}",
            f"data.image_size={SIZE}",
            "train.epochs=2",
            "train.batch_size=16",
            "train.strategy=linear_probe",
            f"train.model_dir={root / 'models/student'}",
            f"train.checkpoint_dir={root / 'models/checkpoints'}",
            "eval.bootstrap=200",
            "eval.gradcam_examples=2",
            "robustness.max_samples=6",
            "robustness.epsilons_255=[1,2]",
            "robustness.pgd_steps=1",
            "robustness.apgd_steps=1",
            "robustness.universal_images=4",
            "robustness.universal_steps=1",
            "robustness.reference_probe=false",
            "robustness.square_max_samples=0",
            "gates.min_clean_auc=0.0",
            "gates.max_teacher_transfer_success=null",
            "gates.max_universal_fooling=null",
            "gates.min_worst_group_auc=null",
            "registry.model_name=three-classes",
            f"serving.bentoml_home={root / 'bentoml'}",
            f"serving.export_dir={root / 'bentos'}",
            f"serving.monitor_store={root / 'monitor.sqlite'}",
            "serving.ood_gate=false",  # every reply carries probabilities
        ]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MEDTRANSFER_ARTIFACT_ROOT", str(root / "mlartifacts"))
        # BentoML binds its store once per process: serving.bentoml_home here, or the store an
        # earlier in-process package stage bound (its BENTOML_HOME stays set); the reply says
        # which, and the server serves from it.
        run_ingest(params, progress=False)
        train = run_train(params, progress=False)
        metrics = run_evaluate(params)
        robustness = run_robustness(params, progress=False)
        register = run_register(params)
        package = run_package(params)
        env = {k: v for k, v in os.environ.items()}
    home = Path(package["bentoml_home"])
    process, url = start_server(package["bento"], home, root / "server.log", env)
    try:
        wait_ready(process, url, root / "server.log")
        yield ThreeClassRun(root, train, metrics, robustness, register, url, uri)
    finally:
        stop_server_tree(process)


def test_the_test_split_is_reported_per_class_with_sklearns_figures_and_intervals(
    three_class_run: ThreeClassRun,
) -> None:
    from tasks.config import load_params
    from tasks.data.dataset import load_processed
    from tasks.evaluation.evaluation import evaluate_configured
    from tasks.model.student_io import load_student

    test = three_class_run.metrics["test"]
    rows = test["per_class"]
    assert [row["class"] for row in rows] == CLASSES
    assert [row["n"] for row in rows] == [7, 7, 7]
    # recomputed from the saved student's own test probabilities with scikit-learn
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml").with_overrides(
        [f"data.processed_dir={three_class_run.root / 'processed'}", "eval.bootstrap=200"]
    )
    model, _ = load_student(three_class_run.root / "models/student")
    evaluation = evaluate_configured(
        model, load_processed(params.data.processed_dir), params.eval, 42
    )
    labels, probs = evaluation.labels["test"], evaluation.probabilities["test"]
    predicted = probs.argmax(axis=1)
    for c, row in enumerate(rows):
        assert row["auc"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-6)
        low, high = row["auc_ci95"]["low"], row["auc_ci95"]["high"]
        assert low <= row["auc"] <= high and high - low > 0
    recall = recall_score(labels, predicted, average=None, labels=[0, 1, 2], zero_division=np.nan)
    precision = precision_score(
        labels, predicted, average=None, labels=[0, 1, 2], zero_division=np.nan
    )
    np.testing.assert_allclose([row["sensitivity"] for row in rows], recall, atol=1e-9)
    np.testing.assert_allclose(
        [np.nan if row["precision"] is None else row["precision"] for row in rows],
        precision,
        atol=1e-9,
    )
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert np.asarray(test["confusion"]).shape == (3, 3)
    assert np.asarray(test["confusion"]).sum() == 21
    assert set(test["ci95"]["balanced_accuracy"]) == {"low", "high"}


def test_the_mlflow_run_and_the_figures_carry_every_class(
    three_class_run: ThreeClassRun,
) -> None:
    client = MlflowClient(three_class_run.tracking_uri)
    run = client.get_run(three_class_run.train["run_id"])
    for c in range(3):
        for measure in ("auc", "sensitivity"):
            assert f"eval_test_{measure}_class{c}" in run.data.metrics
        assert f"eval_test_auc_class{c}_ci_low" in run.data.metrics
    assert "eval_test_balanced_accuracy" in run.data.metrics
    table = client.download_artifacts(run.info.run_id, "evaluation/per_class_test.json")
    assert json.loads(Path(table).read_text())["columns"][:3] == ["class", "n", "auc"]
    roc = json.loads((three_class_run.root / "reports/plots/roc_test.json").read_text())
    assert {row["class"] for row in roc} == set(CLASSES)


def test_robustness_and_registry_take_three_classes_and_the_card_shows_each(
    three_class_run: ThreeClassRun,
) -> None:
    assert three_class_run.robustness["verdict"]["passed"] is True
    assert three_class_run.register["alias_moved"] is True
    client = MlflowClient(three_class_run.tracking_uri)
    version = client.get_model_version("three-classes", three_class_run.register["version"])
    card = version.description
    assert "| decision | the most probable class (no threshold) |" in card
    assert "| class | test images | AUC (one vs rest) | sensitivity | precision |" in card
    for name in CLASSES:
        assert f"| {name} | 7 | " in card


def test_the_served_bento_answers_every_class_summing_to_one(
    three_class_run: ThreeClassRun,
) -> None:
    from tasks.data.dataset import load_processed

    images, _ = load_processed(three_class_run.root / "processed").subset("test")
    reply = requests.post(
        f"{three_class_run.url}/classify/png",
        data=png_bytes(images[0]),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert list(body["probabilities"]) == CLASSES
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    top = max(body["probabilities"], key=body["probabilities"].get)
    assert body["label"] == top
