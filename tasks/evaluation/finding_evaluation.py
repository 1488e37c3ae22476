"""Evaluating a multi-label student: each finding calibrated and thresholded on validation, then
its figures on test with patient-bootstrap intervals (:mod:`tasks.evaluation.multilabel`).

:func:`evaluate_findings` is what :func:`tasks.evaluation.evaluation.evaluate_configured` runs
for a multi-label dataset; its :class:`FindingEvaluation` answers the few questions the train,
evaluate and robustness stages ask of any evaluation (``temperature``, ``test.auc``,
``intervals``, ``metrics()``), the AUC being the macro AUC over the findings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tasks.data.dataset import ProcessedDataset
from tasks.errors import MedtransferError
from tasks.evaluation.multilabel import choose_thresholds, fit_temperatures, multilabel_report
from tasks.model.label_kind import MULTI_LABEL
from tasks.model.predict import probabilities_and_labels
from tasks.model.transforms import ImageDataset, to_tensor_transform


@dataclass(frozen=True)
class MacroFigures:
    """What a caller reads as a split's AUC: the macro AUC over the findings."""

    auc: float


@dataclass
class FindingEvaluation:
    """A multi-label student's val and test figures.

    ``probabilities`` ``{split: (N, K)}`` are calibrated (each finding's sigmoid at its own
    temperature, ``temperatures`` ``(K,)``; ones under ``eval.calibration: none``);
    ``thresholds`` ``(K,)`` were chosen on them on val by ``threshold_rule``. ``tables`` holds
    each split's :func:`tasks.evaluation.multilabel.multilabel_report` (test's with intervals).
    """

    threshold_rule: str
    findings: list[str]
    thresholds: np.ndarray
    temperatures: np.ndarray
    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    tables: dict[str, dict]
    n_test_patients: int
    raw_probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    per_class: dict = field(default_factory=dict)  # never filled: findings are not classes
    label_kind: str = MULTI_LABEL.name

    @property
    def temperature(self) -> tuple[float, ...]:
        """One temperature per finding: what the student is saved and served with."""
        return tuple(float(t) for t in self.temperatures)

    @property
    def threshold(self) -> tuple[float, ...]:
        """One decision threshold per finding."""
        return tuple(float(t) for t in self.thresholds)

    @property
    def val(self) -> MacroFigures:
        return MacroFigures(self.tables["val"]["macro_auc"])

    @property
    def test(self) -> MacroFigures:
        return MacroFigures(self.tables["test"]["macro_auc"])

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """``{"auc": (low, high)}``: the test macro AUC's 95% interval (none unresampled)."""
        bounds = self.tables["test"].get("macro_auc_ci95")
        return {"auc": (bounds["low"], bounds["high"])} if bounds else {}

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: ``val_auc`` and ``test_auc`` (macro), ``test_micro_auc``,
        their ``_ci_low``/``_ci_high``, and per finding ``test_<measure>.<finding>`` with its
        interval, ``threshold.<finding>`` and ``temperature.<finding>``."""
        flat = {"val_auc": self.val.auc, "test_auc": self.test.auc}
        test = self.tables["test"]
        flat["test_micro_auc"] = test["micro_auc"]
        for name, key in (("auc", "macro_auc"), ("micro_auc", "micro_auc")):
            if f"{key}_ci95" in test:
                flat[f"test_{name}_ci_low"] = test[f"{key}_ci95"]["low"]
                flat[f"test_{name}_ci_high"] = test[f"{key}_ci95"]["high"]
        for k, row in enumerate(test["findings"]):
            name = metric_name(row["finding"])
            flat[f"threshold.{name}"] = float(self.thresholds[k])
            flat[f"temperature.{name}"] = float(self.temperatures[k])
            for measure in MULTI_LABEL.metrics:
                flat[f"test_{measure}.{name}"] = row[measure]
                if f"{measure}_ci95" in row:
                    flat[f"test_{measure}_ci_low.{name}"] = row[f"{measure}_ci95"]["low"]
                    flat[f"test_{measure}_ci_high.{name}"] = row[f"{measure}_ci95"]["high"]
        return flat


def metric_name(finding: str) -> str:
    """A finding's name as MLflow accepts it in a metric name (letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", finding)


def evaluate_findings(
    model: nn.Module,
    dataset: ProcessedDataset,
    threshold_rule: str,
    calibration: str = "none",
    bootstrap: int = 0,
    seed: int = 0,
    batch_size: int = 64,
) -> FindingEvaluation:
    """Predict val and test, fit each finding's temperature (``calibration`` ``temperature``)
    and threshold (``threshold_rule``) on val, and report both splits per finding; the test
    split's figures with ``bootstrap`` patient resamples (0: none), seeded by ``seed``."""
    raw, labels = {}, {}
    for split in ("val", "test"):
        raw[split], labels[split] = _predict(model, dataset, split, batch_size)
    temperatures = (
        fit_temperatures(labels["val"], raw["val"])
        if calibration == "temperature"
        else np.ones(labels["val"].shape[1])
    )
    probabilities = {s: MULTI_LABEL.rescale(p, temperatures) for s, p in raw.items()}
    thresholds = choose_thresholds(labels["val"], probabilities["val"], threshold_rule)
    tables = {}
    for split, resamples in (("val", 0), ("test", bootstrap)):
        patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices(split)]
        tables[split] = multilabel_report(
            labels[split],
            probabilities[split],
            thresholds,
            dataset.classes,
            patients,
            resamples,
            seed,
        )
    test_patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    return FindingEvaluation(
        threshold_rule=threshold_rule,
        findings=list(dataset.classes),
        thresholds=thresholds,
        temperatures=np.asarray(temperatures, dtype=np.float64),
        probabilities=probabilities,
        labels=labels,
        tables=tables,
        n_test_patients=len(np.unique(test_patients)),
        raw_probabilities=raw,
    )


def _predict(
    model: nn.Module, dataset: ProcessedDataset, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each finding's uncalibrated probability ``(N, K)`` and the labels ``(N, K)`` of
    ``split``."""
    images, split_labels = dataset.subset(split)
    if len(split_labels) == 0:
        raise MedtransferError(f"The {split} split is empty; add data.")
    loader = DataLoader(
        ImageDataset(images, split_labels, to_tensor_transform(dataset.channels)),
        batch_size=batch_size,
    )
    return probabilities_and_labels(model, loader, torch.device("cpu"), amp=True, kind=MULTI_LABEL)


def report_block(evaluation: FindingEvaluation, resamples: int, seed: int) -> dict:
    """The metrics report of a multi-label student: ``label_kind``, the threshold rule, each
    finding's threshold and temperature, and per split its table (``findings`` rows, macro and
    micro AUC); ``test.auc`` is the macro AUC and ``test.ci95.auc`` its interval, the figure
    the gates and the champion comparison read."""
    test = dict(evaluation.tables["test"])
    test["auc"] = test["macro_auc"]
    test["n_images"] = len(evaluation.labels["test"])
    test["n_patients"] = evaluation.n_test_patients
    test["ci95"] = {
        name: {"low": low, "high": high} for name, (low, high) in evaluation.intervals.items()
    }
    val = dict(evaluation.tables["val"])
    val["auc"] = val["macro_auc"]
    return {
        "label_kind": MULTI_LABEL.name,
        "threshold_rule": evaluation.threshold_rule,
        "threshold": None,  # one per finding: ``thresholds``
        "thresholds": dict(zip(evaluation.findings, evaluation.threshold, strict=True)),
        "calibration": {
            "temperatures": dict(zip(evaluation.findings, evaluation.temperature, strict=True))
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient"},
        "val": val,
        "test": test,
    }


def table_columns(evaluation: FindingEvaluation) -> dict[str, list]:
    """The test per-finding table as MLflow ``log_table`` columns (one row per finding)."""
    rows = evaluation.tables["test"]["findings"]
    columns: dict[str, list] = {"finding": [r["finding"] for r in rows]}
    for key in ("threshold", "n_positive", "n_known"):
        columns[key] = [r[key] for r in rows]
    for measure in MULTI_LABEL.metrics:
        columns[measure] = [r[measure] for r in rows]
        if rows and f"{measure}_ci95" in rows[0]:
            columns[f"{measure}_ci_low"] = [r[f"{measure}_ci95"]["low"] for r in rows]
            columns[f"{measure}_ci_high"] = [r[f"{measure}_ci95"]["high"] for r in rows]
    return columns
