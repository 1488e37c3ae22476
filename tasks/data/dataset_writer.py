"""Writing the processed dataset from what a source yielded, and counting it for the report.

A source (a DICOM folder, a ``.npz``) yields a :class:`SourceYield`: the manifest rows of the kept
images (their bytes already appended to ``images.raw`` in a staging folder), the quarantine rows of
the rest, the file counts and where it came from. :func:`write_dataset` checks the counts, splits
by patient, writes every file of the dataset (:mod:`tasks.data.dataset`) into the staging folder
and swaps it into place whole (:mod:`tasks.atomic`); it returns the :class:`IngestResult`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks import atomic
from tasks.config import DataParams
from tasks.data import dataset as ds_files
from tasks.data.channels import CHANNELS_KEY, GRAY, dataset_channels
from tasks.data.preprocess import gray_to_colour
from tasks.data.quarantine import QUARANTINE_REASONS
from tasks.data.splits import patient_level_split
from tasks.errors import MedtransferError

# What the split kept together (the ingest report's ``split_by``): each patient's images
# (DICOM PatientID, a labels CSV's patient column), each image alone (image files without a
# patient column), or the source's own split (a MedMNIST .npz).
SPLIT_BY_PATIENT, SPLIT_BY_IMAGE, SPLIT_BY_SOURCE = "patient", "image", "source"


@dataclass
class SourceYield:
    """What one source yielded, for :func:`write_dataset`.

    Attributes:
        rows: one manifest row per kept image, in the order its bytes are in ``images.raw``
            (``image_sha256``, ``source_file``, ``frame``, ``label``, ``patient_hash``,
            ``sop_uid_hash``, ``notes``; ``split`` when the source keeps its own split;
            :data:`CHANNELS_KEY`, the image's channels as stored in ``images.raw``, 1 if absent).
        quarantine: one row per left-out file (``source_file``, ``reason``, ``detail``).
        files_seen: the input files (for a ``.npz``, its images).
        ingested: the input files that gave at least one image.
        kind: the source kind (``dicom_folder``, ``image_folder``, ``synthetic``, ``npz``); a
            ``.npz`` keeps its split.
        name: the dataset's name (``data.name`` or the source kind, never a path).
        labels_from: where its labels came from, in words (``tasks.data.dataset.CSV_LABELS``…).
        findings: the K finding names of a multi-label source, whose rows each carry
            ``findings``, their 0/1 vector ``(K,)``; None for one class per image.
    """

    rows: list[dict]
    quarantine: list[dict]
    files_seen: int
    ingested: int
    kind: str
    name: str
    labels_from: str
    findings: list[str] | None = None


@dataclass
class IngestResult:
    """Counts of one ingestion run (the content of the ingest report, :data:`tasks.reports.INGEST`)."""

    processed_dir: Path
    source_kind: str
    files_seen: int
    ingested: int
    quarantined: int
    images: int
    quarantined_by_reason: dict[str, int]
    splits: dict[str, dict[str, int]]
    classes: dict[str, int]
    # 1 (gray) or 3 (colour), and the gray images a colour dataset holds as three equal channels
    channels: int = GRAY
    gray_made_colour: int = 0
    # A labels CSV's row counts (LabelSource.csv_counts); empty for other label sources.
    labels_csv: dict[str, int] = field(default_factory=dict)
    split_by: str = SPLIT_BY_PATIENT
    # single-label, or multi-label (then ``classes`` counts each finding's positive images)
    label_kind: str = ds_files.SINGLE_LABEL_NAME

    def to_report(self) -> dict:
        return {
            "source_kind": self.source_kind,
            "files_seen": self.files_seen,
            "ingested": self.ingested,
            "quarantined": self.quarantined,
            "images": self.images,
            "quarantined_by_reason": self.quarantined_by_reason,
            "splits": self.splits,
            "split_by": self.split_by,
            "classes": self.classes,
            "channels": {"channels": self.channels, "gray_made_colour": self.gray_made_colour},
            **({"labels_csv": self.labels_csv} if self.labels_csv else {}),
            **({"label_kind": self.label_kind} if self.label_kind != SINGLE else {}),
        }


SINGLE = ds_files.SINGLE_LABEL_NAME
COPY_BLOCK_BYTES = 4 * 2**20  # images.raw to images.npy, 4 MiB at a time


def staging_dir(processed_dir: str) -> Path:
    """A fresh staging folder beside ``processed_dir`` to write the next dataset into.

    First undoes what an interrupted run left (:func:`tasks.atomic.recover_folder`): a
    dataset set aside mid-swap goes back in place, old staging folders are removed, so they
    never accumulate.
    """
    processed = Path(processed_dir)
    atomic.recover_folder(processed)
    return atomic.new_staging_folder(processed)


def write_dataset(staging: Path, source: SourceYield, data: DataParams, seed: int) -> IngestResult:
    """Check classes, split, write every file of the dataset into ``staging`` (which holds
    ``images.raw``), swap it into ``data.processed_dir``, count.

    Raises:
        AssertionError: ``ingested + quarantined != files_seen`` (the stage's core promise).
        MedtransferError: fewer than two classes (``staging`` is removed first).
    """
    files_seen, quarantine, rows = source.files_seen, source.quarantine, source.rows
    if source.ingested + len(quarantine) != files_seen:  # the core promise, checked first
        raise AssertionError(
            f"accounting broken: {source.ingested} + {len(quarantine)} != {files_seen}"
        )
    reasons = Counter(item["reason"] for item in quarantine)
    classes, labels = _label_array(source, reasons, staging)
    colour = sum(row.get(CHANNELS_KEY, GRAY) != GRAY for row in rows)
    try:
        channels = dataset_channels(data.channels, colour, len(rows))
    except MedtransferError:
        shutil.rmtree(staging)
        raise
    # Before the digest: a gray image stored as colour is hashed as stored.
    _write_images(staging, rows, data.image_size, channels)
    if source.kind != "npz":  # a MedMNIST archive keeps its official split
        _assign_splits(rows, labels, data, seed)
    for index, row in enumerate(rows):
        # multi-label: no one class; label_index is -1 and labels.npy holds the findings
        row["index"], row["label_index"] = index, -1 if source.findings else labels[index]
    split_counts = _split_counts(rows, classes, source.findings is not None)
    info = _info(source, classes, split_counts, data)
    if channels != GRAY:  # absent for gray: its dataset.json stays as it always was
        info["channels"] = channels
    _write_files(staging, source, labels, info)
    # Swapped in whole: a kill at any point leaves the previous dataset or this one.
    atomic.swap_in_folder(staging, Path(data.processed_dir))
    return IngestResult(
        processed_dir=Path(data.processed_dir),
        source_kind=source.kind,
        files_seen=files_seen,
        ingested=source.ingested,
        quarantined=len(quarantine),
        images=len(rows),
        quarantined_by_reason={reason: reasons.get(reason, 0) for reason in QUARANTINE_REASONS},
        splits=split_counts,
        classes=_class_counts(classes, labels),
        channels=channels,
        gray_made_colour=len(rows) - colour if channels != GRAY else 0,
        label_kind=ds_files.MULTI_LABEL_NAME if source.findings else SINGLE,
    )


def _label_array(
    source: SourceYield, reasons: Counter, staging: Path
) -> tuple[list[str], np.ndarray]:
    """The class names and ``labels.npy``: int64 class indices ``(N,)``, or for a multi-label
    source its finding names and float32 ``(N, K)`` 0/1 (``staging`` is removed on error)."""
    if source.findings is None:
        classes = _classes(source.rows, reasons, source.files_seen, staging)
        index = {name: i for i, name in enumerate(classes)}
        return classes, np.array([index[row["label"]] for row in source.rows], dtype=np.int64)
    width = len(source.findings)
    labels = np.array([row["findings"] for row in source.rows], dtype=np.float32)
    labels = labels.reshape(len(source.rows), width)
    positives, negatives = (labels == 1).sum(axis=0), (labels == 0).sum(axis=0)
    unknown = [name for k, name in enumerate(source.findings) if not positives[k] + negatives[k]]
    if unknown:
        shutil.rmtree(staging)
        raise MedtransferError(
            f"The findings {unknown} are unknown (uncertain, data.uncertain: ignore) in every "
            f"one of the {len(source.rows)} ingested images; nothing can be learnt of them. "
            "Drop them from data.findings or set data.uncertain to zeros or ones."
        )
    one_sided = [
        name for k, name in enumerate(source.findings) if not positives[k] or not negatives[k]
    ]
    if one_sided:
        shutil.rmtree(staging)
        raise MedtransferError(
            f"The findings {one_sided} are present in every image or in none of the "
            f"{len(source.rows)} ingested; a classifier needs both for each finding. Drop "
            "those columns or add images."
        )
    return list(source.findings), labels


def _class_counts(classes: list[str], labels: np.ndarray) -> dict[str, int]:
    """Images of each class; for findings ``(N, K)``, each finding's positive images."""
    if labels.ndim == 2:
        return {name: int((labels[:, k] == 1).sum()) for k, name in enumerate(classes)}
    return {name: int((labels == i).sum()) for i, name in enumerate(classes)}


def _assign_splits(rows: list[dict], labels: np.ndarray, data: DataParams, seed: int) -> None:
    """Set each row's ``split`` by patient (:func:`tasks.data.splits.patient_level_split`),
    findings ``(N, K)`` stratified by :func:`finding_strata`."""
    splits = patient_level_split(
        [row["patient_hash"] for row in rows],
        finding_strata(labels) if labels.ndim == 2 else labels,
        data.val_fraction,
        data.test_fraction,
        seed,
    )
    for row, split in zip(rows, splits, strict=True):
        row["split"] = split


def finding_strata(labels: np.ndarray) -> np.ndarray:
    """One stratum per image ``(N,)`` int64 from its findings ``(N, K)`` (1, 0, NaN): its
    rarest present finding's column, ``K`` for an image with none present, so that every
    finding's few positive patients are spread over the splits as a class's are."""
    present = labels == 1
    rarity = present.sum(axis=0)  # positive images per finding
    order = np.where(present, rarity[None, :], np.iinfo(np.int64).max)
    return np.where(present.any(axis=1), order.argmin(axis=1), labels.shape[1]).astype(np.int64)


def _write_files(staging: Path, source: SourceYield, labels: np.ndarray, info: dict) -> None:
    """The dataset's files in ``staging`` besides the images: labels ``(N,)`` (or ``(N, K)``), manifest,
    quarantine, info."""
    np.save(staging / ds_files.LABELS_FILE, labels)
    _write_csv(
        staging / ds_files.MANIFEST_FILE, ds_files.manifest_columns(source.rows), source.rows
    )
    _write_csv(staging / ds_files.QUARANTINE_FILE, ds_files.QUARANTINE_COLUMNS, source.quarantine)
    (staging / ds_files.INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _info(
    source: SourceYield,
    classes: list[str],
    split_counts: dict[str, dict[str, int]],
    data: DataParams,
) -> dict:
    """``dataset.json``: classes, image size, counts per split and the source record (its name,
    where its labels came from, the counts and a content digest of the rows)."""
    record = ds_files.DatasetSource(
        kind=source.kind,
        name=source.name,
        labels=source.labels_from,
        content_sha256=ds_files.content_digest(source.rows),
        files_seen=source.files_seen,
        ingested=source.ingested,
        quarantined=len(source.quarantine),
        images=len(source.rows),
        image_size=data.image_size,
        multiframe=data.multiframe,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
    )
    kind = {ds_files.LABEL_KIND_KEY: ds_files.MULTI_LABEL_NAME} if source.findings else {}
    return {
        **kind,  # absent for single-label: its dataset.json stays as it always was
        "classes": classes,
        "image_size": data.image_size,
        "source_kind": source.kind,
        "multiframe": data.multiframe,
        "images": len(source.rows),
        "splits": split_counts,
        ds_files.SOURCE_KEY: record.to_info(),
    }


def _classes(rows: list[dict], reasons: Counter, files_seen: int, staging: Path) -> list[str]:
    """The sorted class names of the kept images.

    Raises:
        MedtransferError: fewer than two classes (the staging folder is removed first).
    """
    classes = sorted({row["label"] for row in rows})
    if len(classes) < 2:
        shutil.rmtree(staging)
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "none"
        raise MedtransferError(
            f"Only {len(classes)} class ({classes}) among {len(rows)} ingested images of "
            f"{files_seen} files (quarantined: {summary}). A classifier needs at least two "
            "labels; check the labels CSV or the class sub-folders."
        )
    return classes


def _write_images(staging: Path, rows: list[dict], size: int, channels: int) -> None:
    """``images.raw`` (each row's image in order, ``size`` x ``size`` bytes per channel it was
    stored with) becomes ``images.npy``: ``(N, size, size)`` gray or ``(N, 3, size, size)``
    colour, the .npy header then the bytes copied in blocks. Plain writes, not a memory map:
    a written map's pages count in the process's resident memory until unmapped (100,000
    images of 64 x 64: +400 MiB at the end of ingestion), file writes' do not.

    In a colour dataset a gray image becomes three equal channels and its row's
    ``image_sha256`` is recomputed over what is stored."""
    count = len(rows)
    shape = (count, size, size) if channels == GRAY else (count, channels, size, size)
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}
    with open(staging / ds_files.IMAGES_FILE, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        with open(staging / "images.raw", "rb") as raw:
            if all(row.get(CHANNELS_KEY, GRAY) == channels for row in rows):
                shutil.copyfileobj(raw, out, COPY_BLOCK_BYTES)  # the common case
            else:
                _write_converted(raw, out, rows, size, channels)
    (staging / "images.raw").unlink()


def _write_converted(raw, out, rows: list[dict], size: int, channels: int) -> None:
    """Copy each row's image from ``raw`` to ``out``, a gray one in a colour dataset made three
    equal channels (its row's ``image_sha256`` recomputed over what is stored)."""
    plane = size * size
    for row in rows:
        stored = row.get(CHANNELS_KEY, GRAY)
        image = raw.read(stored * plane)
        if stored != channels:
            converted = gray_to_colour(np.frombuffer(image, np.uint8).reshape(size, size))
            image = np.ascontiguousarray(converted, dtype=np.uint8).tobytes()
            row["image_sha256"] = hashlib.sha256(image).hexdigest()
        out.write(image)


def _split_counts(
    rows: list[dict], classes: list[str], findings: bool = False
) -> dict[str, dict[str, int]]:
    """Per split: images, patients and images of each class (``findings``: each finding's
    positive images, ``finding_<name>``)."""
    if findings:
        return {
            split: {
                "images": sum(row["split"] == split for row in rows),
                "patients": len({row["patient_hash"] for row in rows if row["split"] == split}),
                **{
                    f"finding_{name}": sum(
                        bool(row["split"] == split and row["findings"][k] == 1) for row in rows
                    )
                    for k, name in enumerate(classes)
                },
            }
            for split in ds_files.SPLITS
        }
    return {
        split: {
            "images": sum(row["split"] == split for row in rows),
            "patients": len({row["patient_hash"] for row in rows if row["split"] == split}),
            **{
                f"class_{name}": sum(row["split"] == split and row["label"] == name for row in rows)
                for name in classes
            },
        }
        for split in ds_files.SPLITS
    }


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
