"""Saving and loading a trained student as one file: weights plus how to rebuild it.

``models/student/model.pt`` holds ``{"state_dict": ..., "spec": {...}}``; the spec names the
teacher, strategy, classes and image size, so evaluation, robustness, registration and the
BentoML service rebuild exactly the trained network (with ``pretrained=False``: the weights
come from the file) and load it with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tasks import atomic
from tasks.errors import MedtransferError

MODEL_FILE = "model.pt"
# A `train.compare` run also keeps every strategy's student, in <model_dir>/strategies/<name>/.
STRATEGIES_SUBDIR = "strategies"


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student's architecture."""

    teacher: str
    strategy: str
    unfreeze_blocks: int
    num_classes: int
    dropout: float
    image_size: int
    classes: tuple[str, ...]
    teacher_weights_sha256: str
    # Softmax temperature fitted on validation (eval.calibration); every probability that
    # leaves the product is softmax(logits / temperature). 1.0: uncalibrated, and what a
    # student saved before calibration existed reads as. Multi-label: one per finding, each
    # finding's probability sigmoid(logit / its temperature).
    temperature: float | tuple[float, ...] = 1.0
    # Input channels: 1 gray, 3 colour (tasks.data.channels); 1 is what a student saved before
    # colour existed reads as.
    channels: int = 1
    # single-label (one class, softmax), or multi-label (``classes`` are findings, one sigmoid
    # each: tasks.model.label_kind); single-label is what a student saved before reads as.
    label_kind: str = "single-label"

    @property
    def kind(self):
        """The label kind object (:func:`tasks.model.label_kind.kind_named`)."""
        from tasks.model.label_kind import kind_named

        return kind_named(self.label_kind)


def build_from_spec(spec: StudentSpec) -> nn.Module:
    """The student architecture of ``spec`` with untrained weights (load a state dict next)."""
    from tasks.model.student import build_student

    return build_student(
        spec.teacher,
        spec.strategy,
        num_classes=spec.num_classes,
        unfreeze_blocks=spec.unfreeze_blocks,
        pretrained=False,
        dropout=spec.dropout,
        channels=spec.channels,
    )


def save_student(model: nn.Module, spec: StudentSpec, folder: str | Path) -> Path:
    """Write ``folder/model.pt`` atomically (:func:`tasks.atomic.write_file`: a unique
    temporary name, so concurrent or killed writers never leave a mixed file); returns its
    path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "spec": {**asdict(spec), "classes": list(spec.classes)}}
    return atomic.write_file(path, lambda partial: torch.save(payload, partial))


def load_student(folder: str | Path) -> tuple[nn.Module, StudentSpec]:
    """Rebuild and load the student saved in ``folder``; the model is returned in eval mode.

    Raises:
        MedtransferError: no saved model there (run ``medtransfer train`` first).
    """
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise MedtransferError(
            f"No trained student at {path}. Run `medtransfer train` (or `dvc repro train`) first."
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    spec_dict = dict(payload["spec"])
    spec_dict["classes"] = tuple(spec_dict["classes"])
    if isinstance(spec_dict.get("temperature"), list | tuple):  # one per finding
        spec_dict["temperature"] = tuple(float(t) for t in spec_dict["temperature"])
    spec = StudentSpec(**spec_dict)
    model = build_from_spec(spec)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, spec
