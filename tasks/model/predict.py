"""Running a model over images: the one forward pass that training's validation, evaluation,
the attacks, inference and the serving profile all use.

Images go in as float32 ``(N, C, H, W)`` in [0, 1] pixel space (the model normalises them
itself): an array or tensor, cut into batches here, or an iterable of ready ``(B, C, H, W)``
batches (a DataLoader's images). What comes out is numpy on the CPU: float32 logits or
probabilities ``(N, n_classes)``, or int64 classes ``(N,)``. The model runs in eval mode (and is
left in it, as ``model.eval()`` leaves it; a caller that needs its modes back wraps the call, as
the attacks do), without gradients, on ``device`` (default: where its parameters are), with
mixed precision and channels_last when asked for on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import numpy as np
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model.label_kind import SINGLE_LABEL, MultiLabel, SingleLabel
from tasks.model.transforms import to_tensor_transform

Output = Literal["logits", "probabilities", "classes"]


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on GPUs that support it, fp16 on older ones, nothing on the CPU.

    Only the context: the fp16 loss scaler is ``tasks.training.loop.grad_scaler``, made once
    per fit, because its scale factor must carry over from batch to batch.
    """
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def image_batches(
    images: np.ndarray | torch.Tensor, batch_size: int | None = None
) -> Iterator[torch.Tensor]:
    """``(N, C, H, W)`` images → float32 tensors of at most ``batch_size`` images each
    (all in one when None).

    Raises:
        MedtransferError: a ``batch_size`` below 1.
    """
    if batch_size is not None and batch_size < 1:
        raise MedtransferError(f"batch_size must be at least 1, got {batch_size}.")
    tensor = torch.as_tensor(images, dtype=torch.float32)
    step = batch_size or max(len(tensor), 1)
    for start in range(0, len(tensor), step):
        yield tensor[start : start + step]


def run_model(
    model: nn.Module,
    images: np.ndarray | torch.Tensor | Iterable[torch.Tensor],
    *,
    output: Output = "probabilities",
    temperature: float = 1.0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    channels_last: bool = False,
    kind: SingleLabel | MultiLabel = SINGLE_LABEL,
) -> np.ndarray:
    """``model`` over ``images`` in eval mode without gradients (see the module docstring).

    Args:
        images: ``(N, C, H, W)`` pixels in [0, 1], or an iterable of such batches.
        output: ``logits`` float32 ``(N, C)``; ``probabilities`` ``softmax(logits /
            temperature)`` float32 ``(N, C)``; ``classes`` their top class, int64 ``(N,)`` (all
            three through the label kind, :data:`tasks.model.label_kind.SINGLE_LABEL`).
        temperature: the calibration (``StudentSpec.temperature``); 1 is the plain softmax.
        kind: the label kind: a multi-label model's ``probabilities`` are one sigmoid per
            finding (``temperature`` may then be one per finding ``(K,)``); ``classes`` is
            single-label only.
        batch_size: images per forward pass when ``images`` is one array (None: all at once).
        device: where the images go (None: the model's device); the model is not moved.
        amp, channels_last: mixed precision and memory format (GPU only; see
            :func:`autocast_context`).
    """
    if isinstance(images, np.ndarray | torch.Tensor):
        images = image_batches(images, batch_size)
    device = model_device(model) if device is None else torch.device(device)
    model.eval()
    chunks = []
    # no_grad, as validation and the attacks always ran (inference only served): tensors made
    # under inference_mode can never enter autograd, and a model that goes on training between
    # epochs, or is attacked with gradients next, should not have to care
    with torch.no_grad():
        for batch in images:
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                logits = model(batch)
            chunks.append(logits.float().cpu())
    if not chunks:
        return np.zeros((0,), np.int64) if output == "classes" else np.zeros((0, 0), np.float32)
    logits = torch.cat(chunks)
    if output == "classes":
        return SINGLE_LABEL.top_class(logits.numpy())
    if output == "probabilities":
        logits = kind.probabilities(logits, temperature)
    return logits.numpy()


def probabilities_and_labels(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device | None = None,
    amp: bool = False,
    channels_last: bool = False,
    kind: SingleLabel | MultiLabel = SINGLE_LABEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(N, C)`` float32 and labels ``(N,)`` over ``loader``'s
    ``(images (B, C, H, W), labels (B,))`` batches (a DataLoader of an ``ImageDataset``);
    for a multi-label ``kind``, each finding's probability and labels ``(N, K)``."""
    labels: list[np.ndarray] = []

    def images() -> Iterator[torch.Tensor]:
        for batch_images, batch_labels in loader:
            labels.append(np.asarray(batch_labels))
            yield batch_images

    found = run_model(
        model, images(), device=device, amp=amp, channels_last=channels_last, kind=kind
    )
    return found, np.concatenate(labels)


def to_model_input(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 images ``(B, S, S)`` or ``(B, 3, S, S)`` → float32 tensor ``(B, C, S, S)`` in
    [0, 1].

    Uses :func:`tasks.model.transforms.to_tensor_transform`, the transform evaluation uses.
    """
    transform = to_tensor_transform(1 if np.asarray(images[0]).ndim == 2 else 3)
    return torch.stack([transform(np.asarray(image)) for image in images])


def probabilities(
    model: nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    temperature: float | Sequence[float] = 1.0,
    kind: SingleLabel | MultiLabel = SINGLE_LABEL,
) -> np.ndarray:
    """Class probabilities ``(B, C)`` float32 of uint8 images ``(B, S, S)`` (or ``(B, 3, S,
    S)``) in one forward
    pass: ``softmax(logits / temperature)``, the student's calibration
    (``StudentSpec.temperature``). The serving path (:mod:`tasks.model.inference`, the
    profile's features) calls this."""
    if len(images) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return run_model(model, to_model_input(images), temperature=temperature, kind=kind)
