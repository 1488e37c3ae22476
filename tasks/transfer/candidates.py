"""The candidates ``auto`` pilots, from the frozen-feature evidence and two facts of the data.

- **Teachers**: ranked by their best k-NN AUC over taps (:func:`tasks.transfer.selection.choose_transfer`);
  the winner, and the runner-up when its best k-NN AUC lies inside the winner's 95% interval
  (the evidence cannot tell them apart: the pilots will).
- **Depth**, for the best teacher: the evidence's own depth (the deepest tap still about as good as
  the best), ``full`` and ``lp_ft`` (unfreeze everything: features far from ImageNet's, and the
  inherited exposure, move most); for the runner-up, its evidence depth.
- **How many training images**: below :data:`FEW_IMAGES`, unfreezing the whole network is not a
  candidate (it needs more examples than that, the seed's rule): ``linear_probe`` takes its place.
- **Native resolution**: the source's stored size (a ``.npz``'s array header; the median
  ``min(Rows, Columns)`` of a sample of DICOM headers, or of an image folder's PNG / JPEG / TIFF
  headers). When it is below ``data.image_size``,
  the images were upsampled: the decision says so and names the smaller size to ingest at,
  which trains about ``(size / native)^2`` times faster on the same information.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.data import image_files
from tasks.data.npz_source import npz_image_side
from tasks.errors import MedtransferError
from tasks.model.teachers import get_teacher
from tasks.transfer.pilots import Candidate
from tasks.transfer.selection import TapEvidence, choose_depth

# Below this many training images, fine-tuning the whole network is not a candidate.
FEW_IMAGES = 200
# At most this many candidates are piloted (the budget halves them round by round): the best
# teacher's evidence depth, full and lp_ft, and a runner-up teacher the evidence cannot
# separate from it (at 3 the runner-up was always cut when full and lp_ft were candidates).
MAX_CANDIDATES = 4
# DICOM headers read to estimate the native resolution.
DICOM_SAMPLE = 64


def native_resolution(source: str | Path) -> int | None:
    """The source's stored image side in pixels (see the module docstring); None when it
    cannot be read (a missing path, no readable DICOM or image file header)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        try:
            return npz_image_side(path)
        except MedtransferError:
            return None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() != ".csv")
    if not files:
        return None
    sides = []
    # deferred: pydicom only for a DICOM source
    import pydicom

    for file in files[:: max(1, len(files) // DICOM_SAMPLE)][:DICOM_SAMPLE]:
        side = image_files.stored_side(file)  # an image folder's PNG / JPEG / TIFF
        if side is not None:
            sides.append(side)
            continue
        try:
            header = pydicom.dcmread(
                file, stop_before_pixels=True, specific_tags=["Rows", "Columns"]
            )
            sides.append(min(int(header.Rows), int(header.Columns)))
        except Exception:  # not a DICOM file, or no Rows/Columns: it says nothing of the size
            continue
    return int(np.median(sides)) if sides else None


def smaller_size(native: int | None, image_size: int) -> int | None:
    """The image size to suggest when the source is stored smaller than ``image_size``: its
    native side rounded up to a multiple of 32 (the teachers' stride), at least 32."""
    if native is None or native >= image_size:
        return None
    suggested = max(32, -(-native // 32) * 32)
    return suggested if suggested < image_size else None


def _teacher_best(rows: list[TapEvidence]) -> TapEvidence:
    return max(rows, key=lambda r: r.knn_auc)


def rank_candidates(
    evidence: dict[str, list[TapEvidence]],
    ranked_teachers: list[str],
    n_train: int,
    strategy: str,
    unfreeze_blocks: int,
) -> list[Candidate]:
    """The candidates, best evidence first.

    Args:
        evidence: each teacher's taps; ranked_teachers: best first.
        n_train: training images.
        strategy, unfreeze_blocks: ``auto``, or the configured strategy (then only the
            teachers are weighed).
    """
    winner = ranked_teachers[0]
    best = _teacher_best(evidence[winner])
    teachers = [winner] + [
        name
        for name in ranked_teachers[1:2]
        if _teacher_best(evidence[name]).knn_auc >= best.knn_auc_low
    ]
    if strategy != "auto":
        return [
            Candidate(name, strategy, unfreeze_blocks, "configured strategy") for name in teachers
        ]
    few = n_train < FEW_IMAGES
    candidates: list[Candidate] = []
    for rank, name in enumerate(teachers):
        chosen, depth, _ = choose_depth(name, evidence[name])
        why = "evidence depth" if rank == 0 else "runner-up teacher inside the interval"
        candidates.append(Candidate(name, chosen, depth, why))
        if rank:
            continue
        blocks = get_teacher(name).num_blocks
        if few:
            candidates.append(Candidate(name, "linear_probe", 0, f"few images (< {FEW_IMAGES})"))
        else:
            candidates.append(Candidate(name, "full", blocks, "unfreeze all"))
            candidates.append(Candidate(name, "lp_ft", blocks, "unfreeze all, head first"))
    unique = list({(c.teacher, c.strategy, c.unfreeze_blocks): c for c in candidates}.values())
    return unique[:MAX_CANDIDATES]
