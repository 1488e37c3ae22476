"""The processed dataset: what ingestion writes and every later stage reads.

Layout of ``data.processed_dir`` (a DVC output of the ``ingest`` stage):

- ``images.npy``: uint8 ``(N, S, S)``, display-space grayscale (0 black, 255 white), S =
  ``data.image_size``;
- ``labels.npy``: int64 ``(N,)`` class indices into ``dataset.json``'s ``classes``;
- ``manifest.csv``: one row per image: ``index, image_sha256, source_file, frame, label,
  label_index, split, patient_hash, sop_uid_hash, notes``;
- ``quarantine.csv``: one row per rejected file: ``source_file, reason, detail``;
- ``dataset.json``: ``classes``, ``image_size``, ``source_kind``, counts per split and class.

No file here holds a patient-identifying DICOM attribute: patients appear only as salted
hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tasks.errors import MedtransferError

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.csv"
QUARANTINE_FILE = "quarantine.csv"
INFO_FILE = "dataset.json"
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = [
    "index",
    "image_sha256",
    "source_file",
    "frame",
    "label",
    "label_index",
    "split",
    "patient_hash",
    "sop_uid_hash",
    "notes",
]
QUARANTINE_COLUMNS = ["source_file", "reason", "detail"]


@dataclass
class ProcessedDataset:
    """A loaded processed dataset.

    Attributes:
        images: uint8 ``(N, S, S)``, memory-mapped (read-only) so large sets stay on disk.
        labels: int64 ``(N,)``.
        splits: ``(N,)`` array of ``"train"``, ``"val"`` or ``"test"``.
        classes: class names; ``labels`` index into it.
        manifest: the manifest table, row ``i`` describing ``images[i]``.
        info: the contents of ``dataset.json``.
        root: the folder it was read from.
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list[str]
    manifest: pd.DataFrame
    info: dict
    root: Path

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return np.flatnonzero(self.splits == split)

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of one split, loaded into memory."""
        idx = self.indices(split)
        return np.asarray(self.images[idx]), self.labels[idx]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def load_processed(processed_dir: str | Path) -> ProcessedDataset:
    """Read a processed dataset written by the ingest stage.

    Raises:
        MedtransferError: when the folder or one of its files is missing, telling the user to
            run ``medtransfer ingest`` (or ``dvc repro ingest``) first.
    """
    root = Path(processed_dir)
    missing = [
        name
        for name in (IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, INFO_FILE)
        if not (root / name).is_file()
    ]
    if missing:
        raise MedtransferError(
            f"No processed dataset at {root} (missing {', '.join(missing)}). "
            "Run `medtransfer ingest` (or `dvc repro ingest`, or `dvc pull`) first."
        )
    images = np.load(root / IMAGES_FILE, mmap_mode="r")
    labels = np.load(root / LABELS_FILE)
    manifest = pd.read_csv(root / MANIFEST_FILE, keep_default_na=False)
    info = json.loads((root / INFO_FILE).read_text())
    if not (len(images) == len(labels) == len(manifest)):
        raise MedtransferError(
            f"The processed dataset at {root} is inconsistent ({len(images)} images, "
            f"{len(labels)} labels, {len(manifest)} manifest rows). Re-run `medtransfer ingest`."
        )
    return ProcessedDataset(
        images=images,
        labels=labels.astype(np.int64),
        splits=manifest["split"].to_numpy(dtype=str),
        classes=list(info["classes"]),
        manifest=manifest,
        info=info,
        root=root,
    )


def dataset_version(processed_dir: str | Path, lock_file: str | Path = "dvc.lock") -> str:
    """The version of a processed dataset: DVC's hash of the folder.

    Reads the hash DVC recorded for the ``ingest`` stage's output in ``dvc.lock`` when that
    entry describes the folder as it is now; otherwise computes the same kind of content hash
    (``md5`` of the sorted file hashes, suffixed ``.dir``) from the files themselves, so a run
    outside DVC still names its data exactly.

    Returns:
        A string like ``"3f2a...e1.dir"``.
    """
    root = Path(processed_dir)
    computed = directory_md5(root)
    lock = Path(lock_file)
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            for out in stages.get("ingest", {}).get("outs", []):
                if Path(out.get("path", "")) == root and out.get("md5") == computed:
                    return str(out["md5"])
        except yaml.YAMLError:
            pass
    return computed


def directory_md5(root: Path) -> str:
    """DVC-style directory hash: md5 of the JSON list of ``{"md5", "relpath"}`` entries."""
    if not root.is_dir():
        raise MedtransferError(
            f"No processed dataset folder at {root}; run `medtransfer ingest` first."
        )
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
        entries.append({"md5": digest.hexdigest(), "relpath": path.relative_to(root).as_posix()})
    payload = json.dumps(entries, sort_keys=True, separators=(", ", ": ")).encode()
    return hashlib.md5(payload).hexdigest() + ".dir"
