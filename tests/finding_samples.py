"""A folder of PNG files with its findings in both public labels-table layouts: CheXpert's
one 0/1/-1/blank column per finding and ChestX-ray14's ``|``-joined ``Finding Labels``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.data.synthetic import FINDING_NAMES, write_multi_finding_npz

CHEXPERT_CSV = "chexpert.csv"
CHESTXRAY14_CSV = "data_entry.csv"


def write_finding_folder(
    folder: Path, n_images: int, size: int, seed: int, uncertain_every: int = 7
) -> tuple[Path, np.ndarray]:
    """``n_images`` synthetic multi-finding chest scenes (:func:`write_multi_finding_npz`) as
    ``img/NNNN.png`` in ``folder``, two images per patient, and beside ``folder`` (so that
    neither table is a file of the folder) :data:`CHEXPERT_CSV` (columns
    ``Path``, ``patient`` and one per finding of :data:`FINDING_NAMES`: every
    ``uncertain_every``-th cell ``-1``, absent cells alternately ``0`` and blank) and
    :data:`CHESTXRAY14_CSV` (``Image Index``, ``Finding Labels``, ``Patient ID``).

    Returns:
        ``(folder, truth)``: truth ``(n_images, 3)`` float32 0/1, the findings drawn in each
        image; the CheXpert table's ``-1`` cells are those of its flat index divisible by
        ``uncertain_every``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    npz = write_multi_finding_npz(folder.parent / "scenes.npz", {"train": n_images}, size, seed)
    with np.load(npz) as archive:
        images, truth = archive["train_images"], archive["train_labels"].astype(np.float32)
    npz.unlink()
    (folder / "img").mkdir(parents=True)
    paths = [f"img/{i:04d}.png" for i in range(n_images)]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(folder / path)
    patients = [f"p{i // 2:03d}" for i in range(n_images)]
    cells = truth.astype(np.int64).astype(str).astype(object)
    cells[(cells == "0") & (np.arange(truth.size).reshape(truth.shape) % 2 == 1)] = ""
    cells.ravel()[::uncertain_every] = "-1"
    chexpert = pd.DataFrame({"Path": paths, "patient": patients})
    for k, name in enumerate(FINDING_NAMES):
        chexpert[name] = cells[:, k]
    chexpert.to_csv(folder.parent / CHEXPERT_CSV, index=False)
    lists = ["|".join(n for n, v in zip(FINDING_NAMES, row, strict=True) if v) for row in truth]
    pd.DataFrame(
        {
            "Image Index": paths,
            "Finding Labels": [names or "No Finding" for names in lists],
            "Patient ID": patients,
        }
    ).to_csv(folder.parent / CHESTXRAY14_CSV, index=False)
    return folder, truth
