"""A MedMNIST-format ``.npz``: checked without writing anything, then read into dataset rows.

MedMNIST keeps an official train/val/test split and publishes no patient identities (its split is
already patient-level), so each image is its own "patient" and keeps its split.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from tasks.config import DataParams
from tasks.data import dataset as ds_files
from tasks.data.channels import CHANNELS_KEY, keeps_colour
from tasks.data.patient_hash import salted_hash
from tasks.data.preprocess import luma, resize_any, uint8_to_display
from tasks.errors import MedtransferError


def check_npz(path: Path) -> dict[str, np.ndarray]:
    """Check a MedMNIST-format archive without writing anything; returns each split's labels.

    The image arrays are checked from their ``.npy`` headers alone (shape and dtype), so a large
    archive is not decompressed twice; the label arrays are small and read in full.

    Returns:
        ``{split: int64 labels of shape (N,)}`` for ``train``, ``val`` and ``test``; float32
        ``(N, K)`` 0/1 for an archive with K > 1 labels per image (multi-label findings).

    Raises:
        MedtransferError: one line naming the archive, the array and what is wrong: a missing
            or unreadable array, an object (pickled) array, images that are not uint8
            ``(N, H, W)`` or ``(N, H, W, 3)``, an empty split, labels of another length than
            the images, labels that are not whole numbers, or several labels per image that
            are not each 0 or 1.
    """
    if not path.is_file():
        raise MedtransferError(f"The .npz file {path} does not exist.")
    headers = _npz_headers(path)
    needed = [f"{split}_{kind}" for split in ds_files.SPLITS for kind in ("images", "labels")]
    missing = [key for key in needed if key not in headers]
    if missing:
        raise MedtransferError(f"{path} lacks {missing}; a MedMNIST-format archive holds {needed}.")
    for key in needed:
        if headers[key][1].hasobject:
            raise MedtransferError(
                f"{path}: {key} is an array of Python objects; medtransfer reads plain numeric "
                "arrays and never unpickles (save the images as uint8 and labels as integers)."
            )
    labels: dict[str, np.ndarray] = {}
    with np.load(path) as archive:
        for split in ds_files.SPLITS:
            shape, dtype = headers[f"{split}_images"]
            _check_npz_images(path, f"{split}_images", shape, dtype)
            labels[split] = _npz_labels(
                path, split, _read_npz_array(archive, path, f"{split}_labels"), shape[0]
            )
    return labels


def npz_image_side(path: Path) -> int | None:
    """The stored side of a MedMNIST-format ``.npz``'s images (``min(H, W)`` of
    ``train_images``), read from the array header alone; None when there is no such array."""
    shape = _npz_headers(path).get("train_images", ((),))[0]
    return int(min(shape[1:3])) if len(shape) >= 3 else None


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of every ``.npy`` member, read from the headers only."""
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(handle)
                headers[member.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise MedtransferError(
            f"{path} is not a readable .npz archive ({type(err).__name__}: {err})."
        ) from err
    return headers


def _check_npz_images(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Images must be uint8 ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, with N > 0."""
    rgb = len(shape) == 4 and shape[3] == 3
    if len(shape) != 3 and not rgb:
        raise MedtransferError(
            f"{path}: {key} has shape {shape}; medtransfer takes 2-D images, (N, H, W) grayscale "
            "or (N, H, W, 3) RGB, not volumes (MedMNIST 3D) or other channel counts."
        )
    if dtype != np.uint8:
        raise MedtransferError(
            f"{path}: {key} holds {dtype} values; MedMNIST-format images are uint8 (0-255)."
        )
    if 0 in shape:
        raise MedtransferError(
            f"{path}: {key} is empty (shape {shape}); every split needs at least one image."
        )


def _read_npz_array(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except Exception as err:  # a damaged member: zlib, CRC or truncation errors
        raise MedtransferError(
            f"{path}: {key} cannot be read ({type(err).__name__}: {err})."
        ) from err


def _npz_labels(path: Path, split: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """One split's labels as int64 ``(N,)``, checked against its ``n_images`` images."""
    key = f"{split}_labels"
    if labels.ndim == 0 or len(labels) != n_images:
        count = "a single value" if labels.ndim == 0 else f"{len(labels)} labels"
        raise MedtransferError(
            f"{path}: {key} holds {count} but {split}_images holds {n_images} images; "
            "each image needs exactly one label."
        )
    labels = labels.reshape(n_images, -1)
    if labels.shape[1] != 1:  # one 0/1 column per finding: ChestMNIST's multi-label layout
        return _finding_columns(path, key, labels)
    labels = labels[:, 0]
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    # Whole numbers stored as floats (1.0) are integers in all but dtype; 0.5 or NaN is not a class.
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if not bad.any():
            return labels.astype(np.int64)
        first = int(np.flatnonzero(bad)[0])
        raise MedtransferError(
            f"{path}: {key}[{first}] is {float(labels[first])}; labels must be whole class numbers."
        )
    raise MedtransferError(
        f"{path}: {key} holds {labels.dtype} values; labels must be integer class numbers."
    )


def _finding_columns(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """Several labels per image ``(N, K)``, each a finding present (1) or absent (0): float32
    ``(N, K)``. Anything else (2, 0.5, NaN: an unknown needs a declared policy, which only
    the findings CSVs have) is one line naming the first bad cell."""
    if labels.dtype.kind not in "iufb":
        raise MedtransferError(
            f"{path}: {key} holds {labels.dtype} values; findings must be 0 or 1."
        )
    values = labels.astype(np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise MedtransferError(
            f"{path}: {key}[{row}, {column}] is {values[row, column]}; with {labels.shape[1]} "
            "labels per image (multi-label findings) each must be 0 (absent) or 1 (present)."
        )
    return values.astype(np.float32)


def npz_findings(path: Path, split_labels: dict[str, np.ndarray]) -> list[str] | None:
    """The finding names of a multi-label archive (labels ``(N, K)`` in every split), from its
    optional ``findings`` array of K names, else ``finding_1`` ... ``finding_K``; None for a
    single-label archive.

    Raises:
        MedtransferError: the splits disagree (one label per image in one, K columns in
            another, or different K), or ``findings`` is not K distinct non-empty names.
    """
    widths = {split: 1 if y.ndim == 1 else y.shape[1] for split, y in split_labels.items()}
    if len(set(widths.values())) > 1:
        raise MedtransferError(
            f"{path}: the splits hold different numbers of labels per image ({widths}); every "
            "split needs the same findings."
        )
    width = next(iter(widths.values()))
    if width == 1:
        return None
    if "findings" not in _npz_headers(path):
        return [f"finding_{k + 1}" for k in range(width)]
    with np.load(path) as archive:
        names = _read_npz_array(archive, path, "findings")
    names = [str(name).strip() for name in np.atleast_1d(names)] if names.dtype.kind == "U" else []
    if len(names) != width or len(set(names)) != width or not all(names):
        raise MedtransferError(
            f"{path}: findings must name each of the {width} label columns once (a 1-D array "
            f"of {width} distinct, non-empty strings)."
        )
    return names


def finding_label(vector: np.ndarray, findings: list[str]) -> str:
    """A multi-label image's manifest ``label``: its present findings joined by ``|`` (as
    ChestX-ray14 writes them), empty for none."""
    return "|".join(name for name, value in zip(findings, vector, strict=True) if value == 1)


def read_npz_rows(
    path: Path,
    split_labels: dict[str, np.ndarray],
    data: DataParams,
    salt: str,
    raw: BinaryIO,
    progress: bool = True,
    findings: list[str] | None = None,
) -> list[dict]:
    """Append every image of the checked archive ``path`` to ``raw``, split by split, as uint8
    ``(S, S)`` grayscale, or ``(3, S, S)`` for an RGB archive unless ``data.channels`` is
    ``gray`` (S = ``data.image_size``); returns their manifest rows (with ``split``).

    ``split_labels`` is :func:`check_npz`'s result. Under ``gray`` RGB images become ITU-R
    BT.601 luma.
    ``progress``: a bar per split on stderr (``--quiet`` turns it off).
    """
    rows: list[dict] = []
    colour = keeps_colour(data)
    with np.load(path) as archive:
        for split in ds_files.SPLITS:
            images, labels = archive[f"{split}_images"], split_labels[split]
            steps = tqdm(
                range(len(images)),
                desc=f"ingest {split}",
                unit="img",
                leave=False,
                disable=not progress,
            )
            for i in steps:
                display = uint8_to_display(images[i])
                if display.ndim == 3 and not colour:  # RGB MedMNIST sets, made gray
                    display = luma(display)
                image = resize_any(display, data.image_size)
                raw.write(image.tobytes())
                rows.append(
                    {
                        CHANNELS_KEY: 1 if image.ndim == 2 else image.shape[0],
                        "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                        "source_file": f"{path.name}:{split}_images[{i}]",
                        "frame": 0,
                        "label": (
                            str(labels[i])
                            if findings is None
                            else finding_label(labels[i], findings)
                        ),
                        "patient_hash": salted_hash(salt, f"npz:{split}:{i}"),
                        "sop_uid_hash": "",
                        "notes": "npz",
                        "split": split,
                        **({"findings": labels[i]} if findings is not None else {}),
                    }
                )
    return rows
