"""The one definition of how a decoded image becomes a stored / served image.

Ingestion applies it to every DICOM frame and every ``.npz`` image; the BentoML service imports
the same functions, so a served image is prepared exactly as a training image was.

Layouts: a gray image is ``(S, S)``; a colour image is channel-first ``(3, S, S)`` (R, G, B),
the layout the model takes, so a colour dataset is ``(N, 3, S, S)`` and a gray one stays
``(N, S, S)``, byte for byte as before colour existed.
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


def resize_colour(frame: np.ndarray, image_size: int) -> np.ndarray:
    """A float [0, 1] colour frame ``(rows, columns, 3)`` → uint8 ``(3, image_size,
    image_size)``: each channel resized exactly as :func:`resize_display` resizes gray."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a (rows, columns, 3) frame, got shape {frame.shape}")
    return np.stack([resize_display(frame[..., c], image_size) for c in range(3)])


def resize_any(frame: np.ndarray, image_size: int) -> np.ndarray:
    """:func:`resize_display` for a 2-D frame, :func:`resize_colour` for ``(rows, columns, 3)``."""
    return (
        resize_colour(frame, image_size) if frame.ndim == 3 else resize_display(frame, image_size)
    )


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of a float ``(..., 3)`` array (the rule ``data.channels: gray`` and a
    gray model's colour uploads follow), float32."""
    return np.asarray(rgb, dtype=np.float32) @ LUMA_WEIGHTS


def gray_to_colour(image: np.ndarray) -> np.ndarray:
    """A uint8 gray ``(S, S)`` image → ``(3, S, S)``, three equal channels (a gray image in a
    colour dataset: R = G = B is what a colour camera records of a gray scene)."""
    return np.repeat(np.asarray(image)[None], 3, axis=0)


# ITU-R BT.601 luma weights, float32 (R, G, B)
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_channels(images: np.ndarray) -> int:
    """Channels of a batch of stored images: ``(N, S, S)`` → 1, ``(N, C, S, S)`` → C."""
    return 1 if images.ndim == 3 else int(images.shape[1])


def uint8_to_display(image: np.ndarray) -> np.ndarray:
    """A uint8 grayscale image (e.g. a MedMNIST or PNG image) → float32 [0, 1]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def uint8_to_model_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(N, H, W)`` or ``(N, 3, H, W)`` (the processed dataset's) → float32
    ``(N, C, H, W)`` in [0, 1]: the pixel space every model here takes (each normalises for its
    teacher itself)."""
    pixels = uint8_to_display(images)
    return pixels[:, None] if pixels.ndim == 3 else pixels
