"""Grad-CAM per predicted class, patient-level bootstrap intervals and temperature scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM

from tasks.evaluation.evaluation import GRADCAM_LAYER, gradcam_maps
from tasks.model.student import build_student
from tasks.model.teachers import DEFAULT_TEACHER


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_student(DEFAULT_TEACHER, "partial", 2, unfreeze_blocks=2).eval()
    with torch.no_grad():  # a head that does not favour one class everywhere
        model.head.weight.normal_(0.0, 1.0)
    return model


def test_gradcam_maps_of_a_mixed_batch_equal_each_images_own_map(student) -> None:
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = np.array([0, 1, 1, 0])  # a batch that mixes predicted classes, as the grid does
    maps = gradcam_maps(student, GRADCAM_LAYER, images, classes)
    cam = GradCAM(nn_module=student, target_layers=GRADCAM_LAYER)
    with torch.enable_grad():
        alone = [
            cam(images[i : i + 1].clone().requires_grad_(True), class_idx=int(c)).detach().numpy()
            for i, c in enumerate(classes)
        ]
    # MONAI's default post-processing flips each map (largest activation 0): ours is 1 - it,
    # but for a flat map (no positive evidence anywhere; image 2 here), which is 0 in both.
    alone = [a if a.max() == a.min() else 1.0 - a for a in alone]
    assert maps.shape == (4, 1, 64, 64)
    # The map is a weighted sum over the layer's 1,280 channels, normalised to [0, 1]. A batch
    # and a single image take different float32 reduction orders (and thread splits), so the
    # two sums may differ by up to about n * eps = 1280 * 1.19e-7 = 1.5e-4 of the range; 1e-5
    # failed on 2 threads (off by 1.07e-5). A wrong class or image moves the map by > 0.05.
    np.testing.assert_allclose(maps, np.concatenate(alone), atol=1280 * np.finfo(np.float32).eps)
    # and the class matters: the other class's map of the same image differs
    other = gradcam_maps(student, GRADCAM_LAYER, images[:1], np.array([1]))
    assert np.abs(other[0] - maps[0]).max() > 0.05


def test_gradcam_maps_are_hottest_where_the_classs_weighted_activation_is_largest(student) -> None:
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    maps = gradcam_maps(student, GRADCAM_LAYER, image, np.array([1]))
    with torch.enable_grad():  # MONAI's raw map: relu of the weighted activations, 2 x 2 here
        raw = GradCAM(nn_module=student, target_layers=GRADCAM_LAYER).compute_map(
            image.clone().requires_grad_(True), class_idx=1
        )
    upsampled = torch.nn.functional.interpolate(raw, size=(64, 64), mode="bilinear")[0, 0]
    assert maps.max() == 1.0 and maps.min() == 0.0
    assert maps[0, 0].argmax() == upsampled.argmax()
    assert maps[0, 0].argmin() == upsampled.argmin()


METRICS_REPORT = {
    "threshold": 0.42,
    "threshold_rule": "youden",
    "calibration": {"temperature": 1.7, "test_ece_uncalibrated": 0.081},
    "bootstrap": {"resamples": 1000, "seed": 42, "unit": "patient"},
    "val": {"auc": 0.9, "accuracy": 0.8, "sensitivity": 0.8, "specificity": 0.8, "ece": 0.05},
    "test": {
        "auc": 0.875,
        "accuracy": 0.8,
        "sensitivity": 0.75,
        "specificity": 0.85,
        "ece": 0.04,
        "n_images": 55,
        "n_patients": 18,
        "ci95": {
            "auc": {"low": 0.701, "high": 0.968},
            "accuracy": {"low": 0.69, "high": 0.9},
            "sensitivity": {"low": 0.5, "high": 0.95},
            "specificity": {"low": 0.7, "high": 1.0},
            "ece": {"low": 0.02, "high": 0.12},
        },
    },
}


def test_model_card_and_run_summary_show_each_test_metric_with_its_interval() -> None:
    from flows.summary import summary_lines
    from tests.conftest import model_card_of

    card = model_card_of(metrics=METRICS_REPORT)
    assert "| test | 0.875 [0.701, 0.968] | 0.800 [0.690, 0.900] |" in card
    assert "55 images of 18 patients" in card and "T = 1.70" in card
    lines = summary_lines({"evaluate": METRICS_REPORT})
    assert lines[0].startswith("test AUC 0.875 [0.701, 0.968], sensitivity 0.750 [0.500, 0.950]")
    assert "18 test patients" in lines[1]


def test_model_card_shows_robustness_rates_with_their_intervals() -> None:
    from tests.conftest import model_card_of

    robustness = {
        "verdict": {"passed": False, "reasons": ["x"]},
        "n_examples": 55,
        "metrics": {"clean_acc": 0.8, "robust_acc_apgd_eps_0.0039": 0.0},
        "intervals": {"clean_acc": [0.68, 0.88], "robust_acc_apgd_eps_0.0039": [0.0, 0.065]},
    }
    card = model_card_of(metrics=METRICS_REPORT, robustness=robustness)
    assert "on the 55 evaluated test images: 0.800 [0.68, 0.88]" in card
    assert "| 0.0039 (1.0/255) | 0.000 [0.00, 0.07] |" in card


class _BrightnessScorer(torch.nn.Module):
    """A "student" whose positive-class probability is the image's mean pixel value: a uint8
    image filled with ``k`` scores ``k / 255`` (logits ``[0, logit(p)]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.mean(dim=(1, 2, 3)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def _scored_dataset(splits: dict[str, tuple[list[int], list[int], list[str]]]):
    """A processed dataset in memory: per split, the fill values (uint8), labels and patients."""
    import pandas as pd

    from tasks.data.dataset import ProcessedDataset

    fills, labels, names, patients = [], [], [], []
    for split, (values, split_labels, split_patients) in splits.items():
        fills += values
        labels += split_labels
        names += [split] * len(values)
        patients += split_patients
    images = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in fills])
    manifest = pd.DataFrame({"split": names, "patient_hash": patients})
    return ProcessedDataset(
        images=images,
        labels=np.array(labels, dtype=np.int64),
        splits=np.array(names),
        classes=["normal", "opacity"],
        manifest=manifest,
        info={},
        root=Path("."),
    )


def test_the_decision_threshold_is_youdens_on_validation_not_on_test() -> None:
    from tasks.evaluation.evaluation import evaluate_student

    # Scores 10..60 / 255. Validation separates at 40 (Youden's J = 1 there); test's positives
    # are only the two brightest, so test's own Youden threshold would be 50 / 255.
    dataset = _scored_dataset(
        {
            "train": ([30, 40], [0, 1], ["t1", "t2"]),
            "val": (
                [10, 20, 30, 40, 50, 60],
                [0, 0, 0, 1, 1, 1],
                ["v1", "v2", "v3", "v4", "v5", "v6"],
            ),
            # test: three patients with two images each (the intervals resample patients)
            "test": ([10, 20, 30, 40, 50, 60], [0, 0, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]),
        }
    )
    evaluation = evaluate_student(_BrightnessScorer(), dataset, "youden", bootstrap=20)
    # float32 softmax of logit(40/255) gives 40/255 back to within a few float32 ulps.
    assert evaluation.threshold == pytest.approx(40 / 255, abs=1e-6)
    # At that threshold test has 1 false positive (40) of 4 negatives: specificity 0.75.
    assert evaluation.test.specificity == pytest.approx(0.75)
    assert evaluation.test.sensitivity == pytest.approx(1.0)
    assert evaluation.val.specificity == evaluation.val.sensitivity == pytest.approx(1.0)
    assert evaluation.n_test_patients == 3  # test's patients, not val's six
