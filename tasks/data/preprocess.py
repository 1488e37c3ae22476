"""The one definition of how a decoded image becomes a stored / served image.

Ingestion applies it to every DICOM frame and every ``.npz`` image; the BentoML service imports
the same functions, so a served image is prepared exactly as a training image was.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_display(frame: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a float [0, 1] grayscale frame to ``image_size`` squared and quantise to uint8.

    The frame is stretched to a square (radiographs are close to square, and the MedMNIST
    convention is the same); shrinking uses a box filter, which averages every source pixel
    (no aliasing of fine texture), and enlarging uses bilinear interpolation.

    Args:
        frame: ``(rows, columns)`` float array with values in [0, 1].
        image_size: side of the output square in pixels.

    Returns:
        ``(image_size, image_size)`` uint8 array, 0 = black, 255 = white.
    """
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {frame.shape}")
    image = Image.fromarray(np.asarray(frame, dtype=np.float32), mode="F")
    shrinking = frame.shape[0] >= image_size and frame.shape[1] >= image_size
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = np.asarray(image.resize((image_size, image_size), resample=resample))
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def uint8_to_display(image: np.ndarray) -> np.ndarray:
    """A uint8 grayscale image (e.g. a MedMNIST or PNG image) → float32 [0, 1]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def uint8_to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(N, H, W)`` (the processed dataset's) → float32 ``(N, 1, H, W)`` in
    [0, 1]: the pixel space every model here takes (each normalises for its teacher itself)."""
    return uint8_to_display(images)[:, None]
