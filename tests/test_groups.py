"""Figures by group: the grouping attributes at ingestion, per-group figures, the worst-group gate."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tasks.config import Params
from tasks.data import groups
from tasks.data.dataset import content_digest, load_processed
from tasks.evaluation.group_metrics import OTHER, group_rows, pooled, worst_group, worst_summary
from tasks.evaluation.metrics import bootstrap_intervals, roc_auc
from tasks.robustness.gates import gate_verdict
from tasks.stages.ingest import run_ingest
from tests.conftest import make_mono_dataset, write_dataset


def test_a_missing_or_malformed_attribute_is_unknown_never_an_error() -> None:
    ds = Dataset()
    ds.Manufacturer = "  Acme\x00Medical "
    ds.PatientAge = "45 years"  # not a DICOM Age String
    values = groups.header_groups(ds)
    assert values == {
        "manufacturer": "Acme Medical",
        "model": "unknown",
        "view": "unknown",
        "body_part": "unknown",
        "sex": "unknown",
        "age_band": "unknown",
    }


@pytest.mark.parametrize(
    ("age", "band"), [("045Y", "40-59"), ("080Y", "80-99"), ("006M", "0-19"), ("", "unknown")]
)
def test_an_age_string_becomes_a_twenty_year_band(age: str, band: str) -> None:
    assert groups.age_band(age) == band


def test_sex_and_age_are_recorded_only_when_eval_groups_lists_them() -> None:
    header = ["manufacturer", "model", "view", "body_part"]
    assert groups.recorded(["manufacturer", "site"], None) == tuple(header)
    assert groups.recorded([], "north") == (*header, "site")
    assert groups.recorded(["age_band", "sex"], None) == (*header, "sex", "age_band")


def test_groups_of_fewer_patients_are_pooled_as_other_and_counted() -> None:
    values = np.array(["A"] * 6 + ["B"] * 2 + ["C"] * 2)
    patients = np.array([0, 1, 2, 3, 3, 3, 4, 4, 5, 6])  # A: 4 patients, B: 1, C: 2
    out, n_pooled = pooled(values, patients, min_size=4)  # A has exactly 4: kept
    assert out.tolist() == ["A"] * 6 + [OTHER] * 4 and n_pooled == 2


def _two_scanners(n_per: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scanner A: perfectly ranked; scanner B: scores that say nothing (AUC 0.5 by design)."""
    labels = np.tile([0, 1], n_per)
    score_a = np.where(labels == 1, 0.9, 0.1)
    score_b = np.full(len(labels), 0.5)
    scores = np.concatenate([score_a, score_b])
    probabilities = np.stack([1 - scores, scores], axis=1)
    scanner = np.array(["A"] * len(labels) + ["B"] * len(labels))
    return np.concatenate([labels, labels]), probabilities, scanner, np.arange(2 * len(labels))


def test_each_group_gets_its_own_figures_with_patient_bootstrap_intervals() -> None:
    labels, probabilities, scanner, patients = _two_scanners()
    rows = group_rows(labels, probabilities, 0.5, patients, {"manufacturer": scanner}, 10, 200, 0)
    a, b = rows
    assert (a["group"], a["n_patients"], a["n_images"], a["auc"]) == ("A", 80, 80, 1.0)
    assert (b["group"], b["auc"], b["sensitivity"], b["specificity"]) == ("B", 0.5, 1.0, 0.0)
    mask = scanner == "B"
    expected = bootstrap_intervals(labels[mask], probabilities[mask], 0.5, patients[mask], 200, 0)
    assert (b["auc_ci_low"], b["auc_ci_high"]) == expected["auc"]
    assert roc_auc(labels, probabilities) > 0.7  # the overall figure hides scanner B


def test_the_gate_judges_the_group_with_the_lowest_auc_lower_bound() -> None:
    labels, probabilities, scanner, patients = _two_scanners()
    rows = group_rows(labels, probabilities, 0.5, patients, {"manufacturer": scanner}, 10, 200, 0)
    worst = worst_group(rows)
    assert worst is not None and worst["group"] == "B"
    assert worst_summary(rows) == {
        "worst_group_auc": 0.5,
        "worst_group_auc_ci_low": worst["auc_ci_low"],
        "groups_judged": 2,
    }
    verdict = gate_verdict({}, 0.75, {"min_worst_group_auc": 0.6}, worst_group=worst)
    assert not verdict.passed
    assert "manufacturer = B" in verdict.reasons[0] and "n=80" in verdict.reasons[0]
    assert gate_verdict({}, 0.75, {"min_worst_group_auc": 0.4}, worst_group=worst).passed


def test_with_no_group_large_enough_the_gate_passes_and_says_why() -> None:
    labels, probabilities, scanner, patients = _two_scanners(n_per=2)
    rows = group_rows(labels, probabilities, 0.5, patients, {"manufacturer": scanner}, 10, 200, 0)
    assert [r["group"] for r in rows] == [OTHER] and rows[0]["auc"] is None
    assert rows[0]["pooled_groups"] == 2
    verdict = gate_verdict({}, 0.75, {"min_worst_group_auc": 0.6}, worst_group=worst_group(rows))
    assert verdict.passed and "not judged: no group" in verdict.checked[0]


def test_ingestion_records_the_scanner_per_image_and_no_patient_attribute(params: Params) -> None:
    run_ingest(params, progress=False)
    manifest = load_processed(params.data.processed_dir).manifest
    recorded = [c for c in manifest.columns if c.startswith("group_")]
    assert recorded == ["group_manufacturer", "group_model", "group_view", "group_body_part"]
    assert set(manifest["group_manufacturer"]) == {"SynthScan-A", "SynthScan-B"}
    assert set(manifest["group_view"]) == {"PA"} and set(manifest["group_body_part"]) == {"CHEST"}
    # the content digest (dataset.json's content_sha256) leaves the grouping columns out
    rows = manifest.to_dict("records")
    bare = [{k: v for k, v in r.items() if not k.startswith("group_")} for r in rows]
    assert content_digest(rows) == content_digest(bare)


def test_a_named_site_and_listed_sex_are_recorded_and_a_file_without_them_is_unknown(
    params: Params, tmp_path
) -> None:
    rng = np.random.default_rng(0)
    for i in range(8):
        extra = {"PatientSex": "M", "Manufacturer": "Acme"} if i < 4 else {}
        ds = make_mono_dataset(
            rng.integers(0, 4096, (16, 16), dtype=np.uint16), patient_id=f"P{i}", **extra
        )
        write_dataset(ds, tmp_path / "src" / ("yes" if i % 2 else "no") / f"{i}.dcm")
    source = params.with_overrides(
        [f"data.source={tmp_path / 'src'}", "data.site=north", "eval.groups=[sex,site]"]
    )
    run_ingest(source, progress=False)
    manifest = load_processed(params.data.processed_dir).manifest.sort_values("source_file")
    assert manifest["group_site"].tolist() == ["north"] * 8
    assert sorted(manifest["group_sex"]) == ["M"] * 4 + ["unknown"] * 4
    assert sorted(manifest["group_manufacturer"]) == ["Acme"] * 4 + ["unknown"] * 4
    assert "group_age_band" not in manifest.columns


def test_the_model_card_shows_the_sets_coverage_and_each_groups_figures() -> None:
    from tests.conftest import model_card_of

    conformal = {
        "method": "aps",
        "coverage": 0.95,
        "threshold": 0.912,
        "n_calibration": 40,
        "test": {
            "n": 55,
            "covered": 53,
            "coverage": 53 / 55,
            "ci95": {"low": 0.877, "high": 0.990},
            "mean_set_size": 1.31,
        },
    }
    figures = {"auc": 0.8, "auc_ci_low": 0.6, "auc_ci_high": 0.95, "coverage": 0.9}
    figures |= {"coverage_ci_low": 0.7, "coverage_ci_high": 0.97, "ece": 0.1}
    rows = [
        {"attribute": "manufacturer", "group": "Acme", "n_patients": 12, "n_images": 30}
        | figures
        | {"sensitivity": 0.75, "sensitivity_ci_low": 0.5, "sensitivity_ci_high": 1.0},
        {"attribute": "manufacturer", "group": "other", "n_patients": 3, "n_images": 7}
        | {"pooled_groups": 2, "auc": None, "coverage": None},
    ]
    card = model_card_of(metrics={"conformal": conformal}, groups=rows)
    assert "held the true class for 53 of 55 images: coverage 0.964 [0.877, 0.990]" in card
    assert "mean set size 1.31 classes" in card and "calibrated on 40 validation" in card
    assert (
        "| manufacturer | Acme | 12 | 30 | 0.800 [0.60, 0.95] | 0.750 [0.50, 1.00] | n/a "
        "| 0.100 | 0.900 [0.70, 0.97] |" in card
    )
    assert (
        "| manufacturer | other (2 groups pooled) | 3 | 7 | n/a | n/a | n/a | n/a | n/a |" in card
    )
