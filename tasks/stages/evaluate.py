"""Evaluation stage: val and test metrics at a threshold chosen on val, plots, Grad-CAM.

:func:`evaluate_student` is the pure part (used by training's strategy comparisons too);
:func:`run_evaluate` is the stage behind ``medtransfer evaluate`` and ``dvc repro evaluate``: it
writes ``reports/metrics.json`` (DVC metrics) and ``reports/plots/``, and logs both to the
training run in MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn
from torch.utils.data import DataLoader

from tasks.data.dataset import ProcessedDataset, load_processed
from tasks.errors import MedtransferError
from tasks.evaluation import plots
from tasks.evaluation.metrics import SplitMetrics, choose_threshold, split_metrics
from tasks.model.student_io import load_student
from tasks.model.transforms import ImageDataset, to_tensor_transform
from tasks.training.loop import predict

METRICS_REPORT = "metrics.json"
# Every student's backbone ends in ``top`` (the last convolution before pooling): the deepest
# layer that still has spatial resolution, which is what Grad-CAM needs.
GRADCAM_LAYER = "backbone.top"


@dataclass
class Evaluation:
    """Metrics and predictions of one student on val and test."""

    threshold_rule: str
    threshold: float
    val: SplitMetrics
    test: SplitMetrics
    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: ``val_auc``, ``test_sensitivity``, ``threshold``, ..."""
        return {**self.val.as_dict("val"), **self.test.as_dict("test"), "threshold": self.threshold}


def evaluate_student(
    model: nn.Module,
    dataset: ProcessedDataset,
    threshold_rule: str,
    batch_size: int = 64,
    device: str = "cpu",
) -> Evaluation:
    """Predict val and test, choose the threshold on val, compute both splits' metrics."""
    probabilities, labels = {}, {}
    for split in ("val", "test"):
        images, split_labels = dataset.subset(split)
        if len(split_labels) == 0:
            raise MedtransferError(
                f"The {split} split is empty; lower the split fractions' rounding by adding data."
            )
        loader = DataLoader(
            ImageDataset(images, split_labels, to_tensor_transform()), batch_size=batch_size
        )
        probabilities[split], labels[split] = predict(model, loader, torch.device(device))
    binary = probabilities["val"].shape[1] == 2
    threshold = (
        choose_threshold(labels["val"], probabilities["val"][:, 1], threshold_rule)
        if binary
        else 0.5
    )
    return Evaluation(
        threshold_rule=threshold_rule,
        threshold=threshold,
        val=split_metrics(labels["val"], probabilities["val"], threshold),
        test=split_metrics(labels["test"], probabilities["test"], threshold),
        probabilities=probabilities,
        labels=labels,
    )


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
    predicted = (
        (probabilities[:, 1] >= evaluation.threshold).astype(int)
        if probabilities.shape[1] == 2
        else probabilities.argmax(1)
    )
    correct = np.flatnonzero(predicted == labels)[:per_group]
    wrong = np.flatnonzero(predicted != labels)[:per_group]
    chosen = np.concatenate([correct, wrong]).astype(int)
    cam = GradCAM(nn_module=model, target_layers=layer)
    chosen_set = ImageDataset(images[chosen], labels[chosen], to_tensor_transform())
    batch = torch.stack([chosen_set[k][0] for k in range(len(chosen))])
    model.eval()
    with torch.enable_grad():
        # The input needs a gradient so that frozen layers (linear probe) still backpropagate.
        maps = (
            cam(batch.requires_grad_(True), class_idx=torch.as_tensor(predicted[chosen]))
            .detach()
            .numpy()
        )
    classes = dataset.classes
    captions = [
        f"{'ok' if predicted[i] == labels[i] else 'WRONG'}: true {classes[labels[i]]}, pred {classes[predicted[i]]} ({probabilities[i].max():.2f})"
        for i in chosen
    ]
    return plots.plot_image_grid(
        [images[i] / 255.0 for i in chosen], list(maps[:, 0]), captions, path
    )


def run_evaluate(params: dict) -> dict:
    """The evaluation stage: reads the saved student, writes reports, logs to its MLflow run.

    Returns:
        The content of ``reports/metrics.json``.
    """
    train_cfg, eval_cfg = params.get("train") or {}, params.get("eval") or {}
    dataset = load_processed(params["data"]["processed_dir"])
    model, spec = load_student(train_cfg.get("model_dir", "models/student"))
    if list(spec.classes) != dataset.classes or spec.image_size != dataset.image_size:
        raise MedtransferError(
            f"The saved student was trained on classes {list(spec.classes)} at {spec.image_size} px, but the "
            f"processed dataset has {dataset.classes} at {dataset.image_size} px. Re-run `medtransfer train`."
        )
    evaluation = evaluate_student(model, dataset, str(eval_cfg.get("threshold", "youden")))
    reports = Path(params.get("reports_dir", "reports"))
    plot_dir = reports / "plots"
    figures = [
        plots.plot_roc(
            {s: (evaluation.labels[s], evaluation.probabilities[s][:, 1]) for s in ("val", "test")},
            plot_dir / "roc.png",
            title=f"ROC: {spec.teacher} {spec.strategy}",
        ),
        plots.plot_confusion(
            evaluation.test.confusion,
            dataset.classes,
            plot_dir / "confusion_test.png",
            f"test, threshold {evaluation.threshold:.3f}",
        ),
    ]
    figures.append(
        gradcam_grid(
            model,
            GRADCAM_LAYER,
            dataset,
            evaluation,
            plot_dir / "gradcam_test.png",
            int(eval_cfg.get("gradcam_examples", 4)),
        )
    )

    report = {
        "threshold_rule": evaluation.threshold_rule,
        "threshold": evaluation.threshold,
        "val": _split_report(evaluation.val),
        "test": _split_report(evaluation.test),
    }
    reports.mkdir(parents=True, exist_ok=True)
    (reports / METRICS_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _log_to_training_run(params, reports, evaluation, figures, report)
    return report


def _split_report(metrics: SplitMetrics) -> dict:
    return {
        "auc": metrics.auc,
        "accuracy": metrics.accuracy,
        "sensitivity": metrics.sensitivity,
        "specificity": metrics.specificity,
        "ece": metrics.ece,
        "confusion": metrics.confusion,
    }


def _log_to_training_run(
    params: dict, reports: Path, evaluation: Evaluation, figures: list[Path], report: dict
) -> None:
    """Add the evaluation to the MLflow run that trained the student (from reports/train.json)."""
    import mlflow

    from tasks.tracking import configure_mlflow

    train_report = reports / "train.json"
    if not train_report.is_file():
        return  # a student trained outside this pipeline: the reports above still stand
    run_id = json.loads(train_report.read_text()).get("run_id")
    if not run_id:
        return
    configure_mlflow(params)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {f"eval_{k}": v for k, v in evaluation.metrics().items() if np.isfinite(v)}
        )
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_dict(report, "evaluation/metrics.json")
