"""Synthetic colour data whose finding is carried by hue alone, for tests and benchmarks.

Each image is a pinkish, stain-like textured background with one round blob. In a positive
image the blob is reddish, in a negative one greenish, and both blobs have the same ITU-R
BT.601 luma, so the finding is (up to noise) invisible in gray: what a gray pipeline throws
away. This is a synthetic construction made to need colour, not a model of any real stain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# Blob colours (R, G, B), 0-255, of equal BT.601 luma (0.299 R + 0.587 G + 0.114 B = 140.5)
POSITIVE_RGB = np.array([220.0, 100.0, 150.0])
NEGATIVE_RGB = np.array([120.0, 160.0, 81.0])


def hue_image(rng: np.random.Generator, size: int, positive: bool) -> np.ndarray:
    """One uint8 ``(size, size, 3)`` image; its blob is reddish when ``positive``."""
    base = np.array([200.0, 150.0, 180.0]) + rng.normal(0, 8, 3)
    texture = rng.normal(0, 14, (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
    image = base + texture
    yy, xx = np.mgrid[:size, :size]
    radius = rng.uniform(0.15, 0.25) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
    colour = (POSITIVE_RGB if positive else NEGATIVE_RGB) + rng.normal(0, 4, 3)
    image[blob] = colour + rng.normal(0, 10, (int(blob.sum()), 1))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def hue_set(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, size, size, 3)`` uint8 and labels ``(n,)`` (alternating 0, 1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return np.stack([hue_image(rng, size, bool(label)) for label in labels]), labels


def write_hue_npz(path: Path, sizes: tuple[int, int, int], size: int, seed: int) -> Path:
    """A MedMNIST-layout RGB ``.npz`` (``(N, H, W, 3)`` images) with ``sizes`` train, val and
    test images."""
    arrays = {}
    for offset, (split, n) in enumerate(zip(("train", "val", "test"), sizes, strict=True)):
        images, labels = hue_set(n, size, seed + offset)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def colour_dicom(rgb: np.ndarray, photometric: str = "RGB", patient_id: str = "PID-1") -> Dataset:
    """A DICOM dataset holding the uint8 ``(H, W, 3)`` image ``rgb`` as ``RGB`` or
    ``YBR_FULL`` (converted with pydicom's own colour conversion)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL photographic
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, uid
    ds.Modality, ds.PatientID = "XC", patient_id
    pixels = convert_color_space(rgb, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else rgb
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=8)
    return ds


def write_hue_dicom_folder(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` colour DICOM files in class sub-folders ``negative/`` and ``positive/``, one
    patient each, alternating RGB and YBR_FULL."""
    images, labels = hue_set(n, size, seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        photometric = "RGB" if i % 2 == 0 else "YBR_FULL"
        ds = colour_dicom(image, photometric, patient_id=f"P{i:04d}")
        path = folder / ("positive" if label else "negative") / f"{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return folder


def write_hue_image_folder(
    folder: Path,
    n: int,
    size: int,
    seed: int,
    *,
    patients: bool = True,
    gray_every: int = 0,
    jpeg_every: int = 0,
    marker: str = "",
) -> Path:
    """An image folder: ``n`` hue images as PNG files (every ``jpeg_every``-th a JPEG, every
    ``gray_every``-th PNG saved gray, as its luma) and ``labels.csv`` (``path``, ``label``
    ``negative``/``positive``, and ``patient``, two images each, when ``patients``).

    ``marker`` is put where a file's metadata and name carry text: each PNG's ``tEXt``
    chunk, each JPEG's EXIF ImageDescription, every file name and every patient name, so a
    test can look for it in what the pipeline writes. Returns ``folder``.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    images, labels = hue_set(n, size, seed)
    rows = ["path,label" + (",patient" if patients else "")]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        jpeg = bool(jpeg_every) and i % jpeg_every == jpeg_every - 1
        name = f"{marker}{i:04d}.{'jpg' if jpeg else 'png'}"
        path = folder / ("sub" if i % 3 == 0 else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if jpeg:
            exif = Image.Exif()
            exif[0x010E] = f"description {marker}"  # ImageDescription
            Image.fromarray(image).save(path, format="JPEG", quality=95, exif=exif)
        else:
            info = PngInfo()
            info.add_text("Comment", f"comment {marker}")
            gray = bool(gray_every) and i % gray_every == gray_every - 1
            pixels = np.rint(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
            Image.fromarray(pixels if gray else image).save(path, format="PNG", pnginfo=info)
        relative = path.relative_to(folder).as_posix()
        row = f"{relative},{'positive' if label else 'negative'}"
        rows.append(row + (f",{marker}patient{i // 2}" if patients else ""))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder
