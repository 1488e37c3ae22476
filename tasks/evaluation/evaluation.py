"""Evaluating a student: val and test metrics at a threshold chosen on val, and Grad-CAM.

:func:`evaluate_student` is used by the evaluate stage (:mod:`tasks.stages.evaluate`), by
training's strategy comparisons and by the robustness stage's clean reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tasks.config import EvalParams
from tasks.data.dataset import ProcessedDataset
from tasks.errors import MedtransferError
from tasks.evaluation import per_class, plots
from tasks.evaluation.finding_evaluation import FindingEvaluation, evaluate_findings
from tasks.evaluation.metrics import (
    SplitMetrics,
    apply_temperature,
    bootstrap_intervals,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    split_metrics,
)
from tasks.model.explain import GRADCAM_LAYER, gradcam_maps  # noqa: F401 - re-exported
from tasks.model.label_kind import SINGLE_LABEL
from tasks.model.predict import probabilities_and_labels
from tasks.model.transforms import ImageDataset, to_tensor_transform


@dataclass
class Evaluation:
    """Metrics and predictions of one student on val and test.

    ``probabilities`` are the calibrated ones (divided by ``temperature``; 1.0 when
    ``eval.calibration`` is ``none``), the threshold is chosen on them; ``raw_probabilities``
    are the plain softmax, kept for the before/after calibration figures. ``intervals`` are
    the test metrics' 95% patient-level bootstrap intervals over ``n_test_patients``.
    ``per_class`` is the test split's per-class table (:func:`per_class.per_class_report`)
    when there are more than two classes, else empty (two classes report the positive one).
    """

    threshold_rule: str
    threshold: float
    val: SplitMetrics
    test: SplitMetrics
    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    temperature: float = 1.0
    raw_probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_test_patients: int = 0
    per_class: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: ``val_auc``, ``test_sensitivity``, ``threshold``,
        ``test_auc_ci_low``/``_high``, ``temperature``, ``test_ece_uncalibrated``, ..."""
        flat = {**self.val.as_dict("val"), **self.test.as_dict("test")}
        for name, (low, high) in self.intervals.items():
            flat[f"test_{name}_ci_low"], flat[f"test_{name}_ci_high"] = low, high
        flat["threshold"] = self.threshold
        flat["temperature"] = self.temperature
        for split, raw in self.raw_probabilities.items():
            flat[f"{split}_ece_uncalibrated"] = expected_calibration_error(self.labels[split], raw)
        if self.per_class:
            flat.update(per_class.flat_metrics(self.per_class, "test"))
        return flat


def evaluate_configured(
    model: nn.Module, dataset: ProcessedDataset, config: EvalParams, seed: int
) -> Evaluation | FindingEvaluation:
    """:func:`evaluate_student` as ``params.yaml``'s ``eval`` section asks (threshold rule,
    calibration, bootstrap resamples), seeded: the one call of the train, evaluate and
    robustness stages, so the three report the same figures for the same student. A
    multi-label dataset gets :func:`tasks.evaluation.finding_evaluation.evaluate_findings`
    (a temperature and a threshold per finding)."""
    if dataset.multilabel:
        return evaluate_findings(
            model, dataset, config.threshold, config.calibration, config.bootstrap, seed
        )
    return evaluate_student(
        model,
        dataset,
        config.threshold,
        calibration=config.calibration,
        bootstrap=config.bootstrap,
        seed=seed,
    )


def evaluate_student(
    model: nn.Module,
    dataset: ProcessedDataset,
    threshold_rule: str,
    batch_size: int = 64,
    device: str = "cpu",
    calibration: str = "none",
    bootstrap: int = 0,
    seed: int = 0,
) -> Evaluation:
    """Predict val and test, calibrate and choose the threshold on val, compute both splits'
    metrics and (``bootstrap`` > 0) the test metrics' patient-level 95% intervals.

    Args:
        calibration: ``temperature`` fits one temperature on val (:func:`fit_temperature`)
            and applies it to both splits; ``none`` keeps the softmax.
        bootstrap: resamples of test patients (0: no intervals); seed: their seed.

    More than two classes: the decision is the top class (no threshold), and the test split
    also gets its per-class table with the same patients' resamples.
    """
    raw, labels = _predict_splits(model, dataset, batch_size, device)
    temperature = (
        fit_temperature(labels["val"], raw["val"]) if calibration == "temperature" else 1.0
    )
    probabilities = {split: apply_temperature(p, temperature) for split, p in raw.items()}
    binary = probabilities["val"].shape[1] == 2
    threshold = (
        choose_threshold(labels["val"], probabilities["val"][:, 1], threshold_rule)
        if binary
        else 0.5
    )
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    intervals = (
        bootstrap_intervals(
            labels["test"], probabilities["test"], threshold, patients, bootstrap, seed
        )
        if bootstrap > 0
        else {}
    )
    return Evaluation(
        threshold_rule=threshold_rule,
        threshold=threshold,
        val=split_metrics(labels["val"], probabilities["val"], threshold),
        test=split_metrics(labels["test"], probabilities["test"], threshold),
        probabilities=probabilities,
        labels=labels,
        temperature=temperature,
        raw_probabilities=raw,
        intervals=intervals,
        n_test_patients=len(np.unique(patients)),
        per_class={} if binary else _per_class(probabilities, labels, dataset, bootstrap, seed),
    )


def _per_class(
    probabilities: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    dataset: ProcessedDataset,
    bootstrap: int,
    seed: int,
) -> dict:
    """The test split's per-class table (more than two classes: the decision is the top
    class), its intervals from the same patient resamples as the macro figures."""
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("test")]
    return per_class.per_class_report(
        labels["test"],
        probabilities["test"],
        SINGLE_LABEL.decide(probabilities["test"], None),
        dataset.classes,
        patients,
        bootstrap,
        seed,
    )


def _predict_splits(
    model: nn.Module, dataset: ProcessedDataset, batch_size: int, device: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Softmax probabilities ``(N, C)`` and labels ``(N,)`` of val and test."""
    probabilities, labels = {}, {}
    for split in ("val", "test"):
        images, split_labels = dataset.subset(split)
        if len(split_labels) == 0:
            raise MedtransferError(
                f"The {split} split is empty; lower the split fractions' rounding by adding data."
            )
        loader = DataLoader(
            ImageDataset(images, split_labels, to_tensor_transform(dataset.channels)),
            batch_size=batch_size,
        )
        # amp as training's validation runs it (bf16 on a GPU, nothing on the CPU)
        probabilities[split], labels[split] = probabilities_and_labels(
            model, loader, torch.device(device), amp=True
        )
    return probabilities, labels


def gradcam_grid(
    model: nn.Module,
    layer: str,
    dataset: ProcessedDataset,
    evaluation: Evaluation,
    path: Path,
    per_group: int = 4,
) -> Path:
    """Grad-CAM over a few correct and a few wrong test predictions, as one PNG.

    The heat map is taken for the predicted class, so a reader sees what drove each decision.
    """
    images, labels = dataset.subset("test")
    probabilities = evaluation.probabilities["test"]
    predicted = SINGLE_LABEL.decide(probabilities, evaluation.threshold)
    correct = np.flatnonzero(predicted == labels)[:per_group]
    wrong = np.flatnonzero(predicted != labels)[:per_group]
    chosen = np.concatenate([correct, wrong]).astype(int)
    transform = to_tensor_transform(dataset.channels)
    chosen_set = ImageDataset(images[chosen], labels[chosen], transform)
    batch = torch.stack([chosen_set[k][0] for k in range(len(chosen))])
    maps = gradcam_maps(model, layer, batch, predicted[chosen])
    classes = dataset.classes
    captions = [
        f"{'ok' if predicted[i] == labels[i] else 'WRONG'}: true {classes[labels[i]]}, pred {classes[predicted[i]]} ({probabilities[i].max():.2f})"
        for i in chosen
    ]
    return plots.plot_image_grid(
        [_displayable(images[i]) for i in chosen], list(maps[:, 0]), captions, path
    )


def _displayable(image: np.ndarray) -> np.ndarray:
    """A stored uint8 image → float [0, 1] for a plot: ``(S, S)`` gray or ``(S, S, 3)`` RGB
    (a colour image's overlay is drawn over its colours)."""
    image = np.asarray(image) / 255.0
    return image if image.ndim == 2 else np.moveaxis(image, 0, -1)
