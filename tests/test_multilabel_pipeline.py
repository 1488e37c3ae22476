"""A multi-label ``.npz`` (labels ``(N, K)`` 0/1, ChestMNIST's layout) through every stage: each
finding kept as a column, trained with one sigmoid each, evaluated, attacked, registered and
packaged per finding, and answered per finding by the packaged student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.config import Params
from tasks.data.synthetic import FINDING_NAMES, write_multi_finding_npz
from tasks.errors import MedtransferError
from tests.test_colour_pipeline import TINY

SPLITS = {"train": 36, "val": 18, "test": 18}


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> dict:
    """The synthetic three-finding set through ingest, train, evaluate, robustness, register
    and package once per module (tiny settings: the path is under test, not the model)."""
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.package import run_package
    from tasks.stages.register import run_register
    from tasks.stages.robustness import run_robustness
    from tasks.stages.train import run_train
    from tests.conftest import mlflow_store_in, outputs_in, params_in

    root = tmp_path_factory.mktemp("multilabel")
    npz = write_multi_finding_npz(root / "findings.npz", SPLITS, 32, seed=3)
    params = params_in(root).with_overrides(
        [
            *TINY,
            f"data.source={npz}",
            "gates.min_worst_group_auc=null",
            "registry.model_name=multi-finding",
            *outputs_in(root),
            "serving.ood_gate=false",  # a tiny model's reply always carries its findings
        ]
    )
    with mlflow_store_in(root, empty_mlflow_db):
        done = {
            "params": params,
            "npz": npz,
            "ingest": run_ingest(params, progress=False).to_report(),
            "train": run_train(params, progress=False),
            "metrics": run_evaluate(params),
            "robustness": run_robustness(params, progress=False),
            "register": run_register(params),
        }
        done["package"] = run_package(params)
        run_id = done["train"]["run_id"]
        client = MlflowClient()
        done["mlflow_metrics"] = client.get_run(run_id).data.metrics
        done["artifacts"] = [a.path for a in client.list_artifacts(run_id, "evaluation")]
        version = client.get_model_version("multi-finding", done["register"]["version"])
        done["card"] = version.description
        done["version_tags"] = version.tags
    return done


def test_an_npz_with_k_label_columns_is_ingested_as_k_findings(multilabel_run: dict) -> None:
    from tasks.data.dataset import load_processed

    dataset = load_processed(multilabel_run["params"].data.processed_dir)
    with np.load(multilabel_run["npz"]) as archive:
        expected = np.concatenate([archive[f"{s}_labels"] for s in ("train", "val", "test")])
    assert dataset.multilabel and dataset.classes == list(FINDING_NAMES)
    np.testing.assert_array_equal(dataset.labels, expected.astype(np.float32))
    assert multilabel_run["ingest"]["label_kind"] == "multi-label"
    assert multilabel_run["ingest"]["classes"] == dict(
        zip(FINDING_NAMES, expected.sum(axis=0).tolist(), strict=True)
    )


def test_each_finding_is_evaluated_with_intervals_and_the_macro_auc_is_their_mean(
    multilabel_run: dict,
) -> None:
    test = multilabel_run["metrics"]["test"]
    rows = test["findings"]
    assert [row["finding"] for row in rows] == list(FINDING_NAMES)
    for row in rows:
        for measure in ("auc", "sensitivity", "specificity"):
            bounds = row[f"{measure}_ci95"]
            assert bounds["low"] <= row[measure] <= bounds["high"]
    assert test["auc"] == pytest.approx(np.mean([row["auc"] for row in rows]))
    assert test["ci95"]["auc"] == test["macro_auc_ci95"]
    assert len(multilabel_run["metrics"]["thresholds"]) == len(FINDING_NAMES)


def test_robustness_reports_flips_per_finding_and_any_finding_flipped(multilabel_run: dict) -> None:
    report = multilabel_run["robustness"]
    metrics = report["metrics"]
    for attack in ("white_box", "teacher_transfer", "universal", "noise"):
        for eps in ("0.0039",):  # TINY's one budget, 1/255
            anything = metrics[f"any_flip_{attack}_eps_{eps}"]
            each = [metrics[f"flip_{attack}.{name}_eps_{eps}"] for name in FINDING_NAMES]
            # an image with one finding flipped counts once in "any": between max and sum
            assert max(each) - 1e-9 <= anything <= sum(each) + 1e-9
    assert report["verdict"]["passed"] is True  # the TINY gates: clean AUC and attacks off


def test_the_registry_compares_on_the_macro_auc_lower_bound_and_the_card_has_each_finding(
    multilabel_run: dict,
) -> None:
    low = multilabel_run["metrics"]["test"]["ci95"]["auc"]["low"]
    register = multilabel_run["register"]
    assert register["test_auc"] == pytest.approx(low)
    assert float(register["tags"]["test_auc"]) == pytest.approx(low)
    card = multilabel_run["card"]
    for name in FINDING_NAMES:
        assert f"| {name} |" in card
    assert "macro AUC" in card


def test_the_packaged_profile_watches_each_findings_probability_for_drift(
    multilabel_run: dict,
) -> None:
    # the drift monitor's reference, written by the package stage beside the Bento's copy
    saved = Path(multilabel_run["params"].reports_dir) / "serving_profile" / "profile.json"
    profile = json.loads(saved.read_text())
    assert profile["probability_deciles"] == []  # no one positive class among findings
    assert len(profile["class_probability_deciles"]) == len(FINDING_NAMES)
    assert all(len(edges) == 9 for edges in profile["class_probability_deciles"])


def test_mlflow_holds_each_findings_figures_and_the_per_finding_table(multilabel_run: dict) -> None:
    metrics = multilabel_run["mlflow_metrics"]
    report = multilabel_run["metrics"]["test"]
    for row in report["findings"]:
        assert metrics[f"eval_test_auc.{row['finding']}"] == pytest.approx(row["auc"])
        assert metrics[f"eval_test_auc_ci_low.{row['finding']}"] == pytest.approx(
            row["auc_ci95"]["low"]
        )
    assert metrics["eval_test_auc"] == pytest.approx(report["macro_auc"])
    assert "evaluation/per_finding_test.json" in multilabel_run["artifacts"]


def test_the_packaged_student_answers_every_finding_with_its_own_threshold(
    multilabel_run: dict,
) -> None:
    import bentoml

    from tasks.model.findings import findings_decision
    from tasks.model.inference import Predictor

    package = multilabel_run["package"]
    stored = bentoml.models.get(package["bento_model"])
    predictor = Predictor.from_folder(stored.path)
    with np.load(multilabel_run["npz"]) as archive:
        images = archive["test_images"][:4]
    probabilities = predictor.predict_images(images)
    # independent sigmoids: (B, K), rows need not sum to 1
    assert probabilities.shape == (4, len(FINDING_NAMES))
    # what the package stage gives the service: the version's thresholds, the evaluate stage's
    thresholds = json.loads(multilabel_run["version_tags"]["thresholds"])
    assert thresholds == list(multilabel_run["metrics"]["thresholds"].values())
    reply = findings_decision(probabilities[0], FINDING_NAMES, thresholds)
    present = [
        n for n, p, t in zip(FINDING_NAMES, probabilities[0], thresholds, strict=True) if p >= t
    ]
    assert reply["label"] == ("|".join(present) or "No Finding")
    assert [row["present"] for row in reply["findings"]] == [
        bool(p >= t) for p, t in zip(probabilities[0], thresholds, strict=True)
    ]


def test_serving_other_findings_than_were_trained_is_refused_in_one_line() -> None:
    from tasks.model.findings import check_findings

    with pytest.raises(MedtransferError, match="trained on 3 findings but is served with 2"):
        check_findings(FINDING_NAMES, FINDING_NAMES[:2], [0.5, 0.5])


def test_an_npz_finding_cell_other_than_0_or_1_is_one_line(tmp_path: Path, params: Params) -> None:
    from tasks.data.npz_source import check_npz

    images = np.zeros((2, 8, 8), np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    arrays = {f"{s}_images": images for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": labels for s in ("train", "val", "test")})
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MedtransferError, match=r"train_labels\[1, 0\] is 2.0; .* 0 \(absent\)"):
        check_npz(tmp_path / "bad.npz")


def test_the_evidence_step_and_adversarial_training_refuse_a_multi_label_set_in_one_line(
    multilabel_run: dict,
) -> None:
    from dataclasses import replace

    from tasks.data.dataset import load_processed
    from tasks.training.strategies import validate
    from tasks.transfer.auto import check_single_label

    params = multilabel_run["params"]
    dataset = load_processed(params.data.processed_dir)
    with pytest.raises(MedtransferError, match="not yet supported for multi-label"):
        check_single_label(dataset)
    adversarial = replace(params.train, strategy="linear_probe+pgd")
    with pytest.raises(MedtransferError, match=r"Adversarial training .* multi-label"):
        validate(adversarial, dataset)


def test_flip_rates_count_each_finding_and_an_image_with_several_flips_once() -> None:
    from tasks.robustness.findings_robustness import flip_rates

    clean = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    attacked = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    per_finding, anything = flip_rates(clean, attacked)
    # image 0 flips findings 0 and 1, image 2 finding 2; images 1 and 3 keep every decision
    assert [(r.value, r.n) for r in per_finding] == [(0.25, 4), (0.25, 4), (0.25, 4)]
    assert (anything.value, anything.n) == (0.5, 4)


def test_a_multi_label_candidate_is_compared_on_its_macro_auc_lower_bound() -> None:
    from tasks.registry.promotion import Candidate, Champion, promotion_decision

    candidate = Candidate(
        run_id="r",
        dataset_version="d1",
        spec={},
        metrics={
            "label_kind": "multi-label",
            "test": {"auc": 0.80, "ci95": {"auc": {"low": 0.70, "high": 0.90}}},
        },
        robustness={"verdict": {"passed": True}},
        ingest={},
    )
    assert candidate.test_auc == 0.70
    # a point estimate of 0.80 would beat 0.75; its lower bound 0.70 does not
    promoted, reasons = promotion_decision(candidate, Champion("1", "d1", 0.75))
    assert not promoted
    assert reasons == [
        "test macro AUC lower bound 0.7000 does not beat version 1's 0.7500 on the same dataset"
    ]


def test_the_served_bento_answers_every_findings_probability_and_decision(
    multilabel_run: dict, tmp_path: Path
) -> None:
    import os

    import requests

    from tests.deploy.conftest import start_server, wait_ready
    from tests.deploy.samples import png_bytes
    from tests.processes import stop_server_tree

    package = multilabel_run["package"]
    with np.load(multilabel_run["npz"]) as archive:
        images, labels = archive["test_images"], archive["test_labels"]
    image = images[int(np.flatnonzero(labels.sum(axis=1) >= 2)[0])]  # two findings or more
    log = tmp_path / "server.log"
    process, url = start_server(
        package["bento"], Path(package["bentoml_home"]), log, dict(os.environ)
    )
    try:
        wait_ready(process, url, log)
        reply = requests.post(
            f"{url}/classify/png",
            data=png_bytes(image),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        info = requests.get(f"{url}/info", timeout=10).json()
    finally:
        stop_server_tree(process)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    thresholds = list(multilabel_run["metrics"]["thresholds"].values())
    assert [row["finding"] for row in body["findings"]] == list(FINDING_NAMES)
    assert [row["threshold"] for row in body["findings"]] == pytest.approx(thresholds)
    for row in body["findings"]:
        assert row["present"] == (row["probability"] >= row["threshold"])
        assert body["probabilities"][row["finding"]] == row["probability"]
    present = [row["finding"] for row in body["findings"] if row["present"]]
    assert body["label"] == ("|".join(present) or "No Finding")
    assert body["prediction_set"] is None
    assert (info["label_kind"], info["classes"]) == ("multi-label", list(FINDING_NAMES))


def test_evaluate_and_robustness_write_every_plot_dvc_yaml_declares(multilabel_run: dict) -> None:
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    declared = [
        entry if isinstance(entry, str) else next(iter(entry))  # a path, or path: {options}
        for stage in ("evaluate", "robustness")
        for entry in stages["stages"][stage]["plots"]
    ]
    reports_dir = Path(multilabel_run["params"].reports_dir)
    missing = [p for p in declared if not (reports_dir / Path(p).relative_to("reports")).is_file()]
    assert declared and not missing
    roc = json.loads((reports_dir / "plots" / "roc_test.json").read_text())
    assert {row["class"] for row in roc} == set(FINDING_NAMES)
