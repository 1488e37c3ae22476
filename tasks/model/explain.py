"""Grad-CAM of a student's decision: the evaluation's figure and the service's DICOM overlay.

One implementation for both: MONAI's ``GradCAM`` on the student's last convolution
(:data:`GRADCAM_LAYER`), one call per explained class (see :meth:`Explainer.maps`), maps
min-max scaled to [0, 1] with 1 where the class's evidence is strongest.

MONAI's default post-processing (``default_normalizer``) maps the largest activation to 0 and
the smallest to 1 (its own docstring: "This will flip magnitudes"): the evaluation's Grad-CAM
grid showed the least relevant regions hottest. :func:`_scale_to_unit` keeps the order.

MONAI registers its hooks on the model when a ``GradCAM`` is built and never removes them, so a
server builds one :class:`Explainer` per model and keeps it; its calls are serialised by
:attr:`Explainer.lock`, which the model's other forward passes take too (the hook stores the
activations of every forward pass of the model, whoever runs it).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from tasks.model.label_kind import SINGLE_LABEL
from tasks.model.predict import to_model_input

# Every student's backbone ends in ``top`` (the last convolution before pooling): the deepest
# layer that still has spatial resolution, which is what Grad-CAM needs.
GRADCAM_LAYER = "backbone.top"


def _scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` maps → each scaled to [0, 1], its largest value 1 (a flat map: 0)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low).clamp_min(1e-12)
    return (maps - low) / span


class Explainer:
    """Grad-CAM maps of one model, its hooks registered once (see the module docstring)."""

    def __init__(self, model: nn.Module, layer: str = GRADCAM_LAYER) -> None:
        self.model = model
        self.cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=_scale_to_unit)
        self.lock = threading.Lock()

    def maps(self, batch: torch.Tensor, classes: np.ndarray) -> np.ndarray:
        """Grad-CAM of each image for its own class: ``(B, 1, H, W)`` float32 maps in [0, 1].

        Args:
            batch: images ``(B, 1, H, W)`` as the model takes them.
            classes: ``(B,)`` the class each image's map explains (e.g. its prediction).

        MONAI's ``GradCAM`` backpropagates ``logits[:, class_idx].sum()``: given one index per
        image it mixes every listed class into every map. So it is called once per class, on
        the images that class explains, and each map depends on its own image and class only.
        """
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        maps = np.zeros((len(batch), 1, *batch.shape[2:]), dtype=np.float32)
        with self.lock, torch.enable_grad():
            self.model.eval()
            for cls in np.unique(classes):
                rows = np.flatnonzero(classes == cls)
                # The input needs a gradient so that frozen layers (linear probe) backpropagate.
                images = batch[torch.as_tensor(rows)].clone().requires_grad_(True)
                maps[rows] = self.cam(images, class_idx=int(cls)).detach().numpy()
        return maps

    def with_maps(
        self, images: np.ndarray, outputs: np.ndarray, threshold: float | None
    ) -> np.ndarray:
        """The service's model outputs ``(B, C + 1)`` (probabilities, OOD score) of uint8
        images ``(B, S, S)`` → ``(B, C + 1 + S * S)``: each row followed by the image's map of
        the class :meth:`tasks.model.label_kind.SingleLabel.decide` picks at ``threshold``."""
        classes = SINGLE_LABEL.decide(outputs[:, :-1].astype(np.float64), threshold)
        maps = self.maps(to_model_input(images), classes)
        return np.concatenate([outputs, maps.reshape(len(images), -1)], axis=1)


def gradcam_maps(
    model: nn.Module, layer: str, batch: torch.Tensor, classes: np.ndarray
) -> np.ndarray:
    """One-off :meth:`Explainer.maps` (the evaluation's figure): ``(B, 1, H, W)`` in [0, 1]."""
    return Explainer(model, layer).maps(batch, classes)
