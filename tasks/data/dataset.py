"""The processed dataset: what ingestion writes and every later stage reads.

Layout of ``data.processed_dir`` (a DVC output of the ``ingest`` stage):

- ``images.npy``: uint8 ``(N, S, S)``, display-space grayscale (0 black, 255 white), S =
  ``data.image_size``; or, for a colour dataset (``data.channels``, see
  :mod:`tasks.data.channels`), ``(N, 3, S, S)``, channel-first R, G, B: the layout the model
  takes;
- ``labels.npy``: int64 ``(N,)`` class indices into ``dataset.json``'s ``classes``;
- ``manifest.csv``: one row per image: ``index, image_sha256, source_file, frame, label,
  label_index, split, patient_hash, sop_uid_hash, notes``, then the grouping attributes
  ingestion recorded (``group_manufacturer``, ``group_model``, ``group_view``,
  ``group_body_part``; ``group_site`` when ``data.site`` is named; ``group_sex`` and
  ``group_age_band`` only when ``eval.groups`` lists them: :mod:`tasks.data.groups`);
- ``quarantine.csv``: one row per rejected file: ``source_file, reason, detail``;
- ``dataset.json``: ``classes``, ``image_size``, ``source_kind``, counts per split and class,
  ``channels: 3`` for a colour dataset (absent for gray, whose files are byte-identical to
  those written before colour existed),
  and ``source``: what was ingested (:class:`DatasetSource`), the record every later stage
  logs, whatever ``-S data.source=...`` says when it runs.

No file here holds a patient-identifying DICOM attribute: patients appear only as salted
hashes, and the grouping attributes are the device's names, the view, the body part, the
user's site label (and, when asked for, sex and a 20-year age band).

Versions: the grouping columns are part of ``manifest.csv``, so the first re-ingestion of an
unchanged source after they were introduced gives a new DVC hash (``dataset_version``) once;
``content_sha256`` (images, labels, splits) stays the same, and so does every later
re-ingestion's hash. Naming ``data.site`` or listing sex or age band in ``eval.groups`` adds a
column, and so a new version, by design: the dataset then holds more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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
GROUP_PREFIX = "group_"  # the grouping attributes' columns (tasks.data.groups.column)
SOURCE_KEY = "source"  # the ingestion record's key in dataset.json
SUBFOLDER_LABELS = "class sub-folders"
CSV_LABELS = "labels CSV"
NPZ_LABELS = "npz arrays"
# data.* settings that hold source paths: left out of what checkpoints record (run.json) and
# replaced by the dataset's name in what MLflow logs
SOURCE_PATH_KEYS = ("source", "labels_csv")


@dataclass
class ProcessedDataset:
    """A loaded processed dataset.

    Attributes:
        images: uint8 ``(N, S, S)`` gray or ``(N, 3, S, S)`` colour, memory-mapped
            (read-only) so large sets stay on disk.
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

    def rows(self, split: str) -> tuple[Rows, np.ndarray]:
        """``(images, labels)`` of one split, the images left on disk: read when indexed
        (training's datasets and feature batches), so memory does not grow with the set."""
        idx = self.indices(split)
        return Rows(self.images, idx), self.labels[idx]

    def group_values(self, attribute: str, split: str) -> np.ndarray:
        """The grouping attribute ``attribute`` (``manufacturer``, ``view``, ...) of one
        split's images ``(n,)`` str; all ``unknown`` where the dataset did not record it (one
        ingested before the attribute, or without it in ``eval.groups``)."""
        idx = self.indices(split)
        name = GROUP_PREFIX + attribute
        if name not in self.manifest.columns:
            return np.full(len(idx), "unknown", dtype=object)
        return self.manifest[name].astype(str).to_numpy()[idx]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        """1 for a gray dataset, 3 for a colour one (from the images' shape)."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[1])

    @property
    def source(self) -> DatasetSource:
        """What this dataset was ingested from (its ``dataset.json`` record)."""
        return source_from_info(self.info, self.root)


class Rows:
    """Rows ``idx`` of an array, read only when indexed: a split of the memory-mapped images
    without the copy that ``images[idx]`` makes (at 224 px, 49 KiB an image).

    ``rows[i]`` is image ``array[idx[i]]``; ``rows[a:b]`` (or an index array) a uint8 array
    of those rows; ``len``, ``shape``, ``dtype`` and ``np.asarray(rows)`` as for an array.
    """

    def __init__(self, array: np.ndarray, idx: np.ndarray) -> None:
        self.array = array
        self.idx = np.asarray(idx, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        return np.asarray(self.array[self.idx[key]])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        rows = np.asarray(self.array[self.idx])
        return rows if dtype is None else rows.astype(dtype)


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


def dataset_version(processed_dir: str | Path) -> str:
    """The version of a processed dataset: DVC's hash of the folder, the ``md5`` that
    ``dvc.lock`` records for the ``ingest`` stage's output once DVC has run it.

    DVC's own object builder (``dvc_data``, what ``dvc add``/``dvc commit`` use) hashes the
    folder, dry-run: nothing is written to a cache, and a folder outside a DVC repository (a
    test's, a run without ``dvc repro``) is named by the same hash.

    Returns:
        A string like ``"3f2a...e1.dir"``.
    """
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem

    root = Path(processed_dir)
    if not root.is_dir():
        raise MedtransferError(
            f"No processed dataset folder at {root}; run `medtransfer ingest` first."
        )
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as staging:
        _, _, tree = build(HashFileDB(fs, staging), str(root.resolve()), fs, "md5", dry_run=True)
    return str(tree.hash_info.value)


@dataclass(frozen=True)
class DatasetSource:
    """What a processed dataset was ingested from: written by ingestion into ``dataset.json``
    and logged by train, evaluate and register instead of the ``data.*`` values they were
    started with, which need not be the ones the dataset was built from.

    Names are data: hospital exports name folders and files after patients and accession
    numbers, so no path of the source is recorded here (nor, through this record, in runs,
    checkpoints or model cards). The source is named by the user's label ``data.name`` and
    identified by ``content_sha256``; file names stay only in the processed folder's
    ``manifest.csv`` and ``quarantine.csv`` (relative to the source), to trace an image back.

    Attributes:
        kind: ``synthetic``, ``dicom_folder``, ``image_folder`` (PNG / JPEG / TIFF) or ``npz``.
        name: ``data.name`` at ingestion, or ``kind`` when it was null.
        labels: where labels came from, in words: ``labels CSV``, ``class sub-folders`` or
            ``npz arrays``.
        content_sha256: SHA-256 of every ingested image's hash, label and split, in order:
            the same content gives the same digest whatever the file names or the salt.
        files_seen, ingested, quarantined, images: ingestion's counts.
        image_size, multiframe, val_fraction, test_fraction: the ``data`` settings that
            shaped the dataset.
    """

    kind: str
    name: str
    labels: str
    content_sha256: str
    files_seen: int
    ingested: int
    quarantined: int
    images: int
    image_size: int
    multiframe: str
    val_fraction: float
    test_fraction: float

    def to_info(self) -> dict:
        """The record as it is stored under ``dataset.json``'s ``source`` key."""
        return asdict(self)

    def mlflow_params(self) -> dict[str, str]:
        """``dataset.*`` parameters naming the source, plus the ``data.*`` parameters that
        shaped the dataset as they were at ingestion (they replace the current ones)."""
        return {
            "dataset.source": self.name,
            "dataset.source_kind": self.kind,
            "dataset.labels": self.labels,
            "dataset.content_sha256": self.content_sha256,
            **{f"dataset.{key}": str(getattr(self, key)) for key in _COUNT_KEYS},
            "data.source": self.name,
            "data.labels_csv": self.labels,
            "data.name": self.name,
            "data.image_size": str(self.image_size),
            "data.multiframe": self.multiframe,
            "data.val_fraction": str(self.val_fraction),
            "data.test_fraction": str(self.test_fraction),
        }

    def mlflow_tags(self, prefix: str = "") -> dict[str, str]:
        """Searchable tags: ``dataset.source`` and ``dataset.source_kind`` (after ``prefix``)."""
        return {
            f"{prefix}dataset.source": self.name,
            f"{prefix}dataset.source_kind": self.kind,
            f"{prefix}dataset.content_sha256": self.content_sha256,
        }


_COUNT_KEYS = ("files_seen", "ingested", "quarantined", "images")


def without_source_paths(data_section: Mapping[str, object]) -> dict[str, object]:
    """The ``data`` parameters without :data:`SOURCE_PATH_KEYS`: what a checkpoint records of
    its data besides the content hash (a path can carry a patient's name)."""
    return {k: v for k, v in data_section.items() if k not in SOURCE_PATH_KEYS}


def manifest_columns(rows: list[Mapping[str, object]]) -> list[str]:
    """:data:`MANIFEST_COLUMNS` and the ``group_*`` columns the rows carry, in first-seen
    order (every row carries the same ones)."""
    extra = [key for key in (rows[0] if rows else {}) if str(key).startswith(GROUP_PREFIX)]
    return [*MANIFEST_COLUMNS, *extra]


def content_digest(rows: Iterable[Mapping[str, object]]) -> str:
    """SHA-256 over the manifest rows' ``image_sha256``, ``label`` and ``split``, in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['image_sha256']}\t{row['label']}\t{row['split']}\n".encode())
    return digest.hexdigest()


def read_source(processed_dir: str | Path) -> DatasetSource:
    """The ingestion record of the processed dataset in ``processed_dir``.

    Raises:
        MedtransferError: no dataset there, or one ingested before datasets recorded their
            source (re-ingesting writes the record).
    """
    root = Path(processed_dir)
    path = root / INFO_FILE
    if not path.is_file():
        raise MedtransferError(
            f"No processed dataset at {root} (missing {INFO_FILE}). Run `medtransfer ingest` first."
        )
    return source_from_info(json.loads(path.read_text()), root)


def source_from_info(info: Mapping, root: str | Path) -> DatasetSource:
    """The :class:`DatasetSource` in the parsed ``dataset.json`` ``info`` of the dataset at
    ``root`` (named in the error)."""
    record = info.get(SOURCE_KEY)
    try:
        return DatasetSource(**record)
    except TypeError as err:  # absent (None) or written by another version
        raise MedtransferError(
            f"The processed dataset at {root} does not record what it was ingested from (it "
            "predates that record); re-run `medtransfer ingest` so runs log its true source."
        ) from err
