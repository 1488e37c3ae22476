"""Ingestion: a DICOM folder, an image folder (PNG / JPEG / TIFF), either as ZIP / TAR
archives (:mod:`tasks.data.archives`), a MedMNIST ``.npz`` or the synthetic set → processed
dataset.

Every input file ends either in the dataset or in ``quarantine.csv`` with a reason, so
``ingested + quarantined == files_seen`` always holds. Files are decoded in parallel worker
processes (:mod:`tasks.data.file_decoding`); the parent keeps the sorted file order and resolves
each file's label here, so the output is byte-identical for the same input and parameters. The
dataset is first written to a staging folder and swapped into place at the end
(:mod:`tasks.data.dataset_writer`, :mod:`tasks.atomic`): an interrupted run leaves the previous
dataset or the new one, never a half-written one or none.

The stage's entry point is :func:`tasks.stages.ingest.run_ingest`; this module is the work:
:func:`ingest_folder` and :func:`ingest_npz` build the dataset and return its counts.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from tasks.config import DataParams
from tasks.data import archives, groups
from tasks.data import dataset as ds_files
from tasks.data.channels import CHANNELS_KEY
from tasks.data.dataset_writer import (
    SPLIT_BY_IMAGE,
    SPLIT_BY_PATIENT,
    SPLIT_BY_SOURCE,
    IngestResult,
    SourceYield,
    staging_dir,
    write_dataset,
)
from tasks.data.file_decoding import DecodeMap, FileOutcome, decode_in_process_pool, list_files
from tasks.data.labels import LabelSource
from tasks.data.npz_source import check_npz, npz_findings, read_npz_rows
from tasks.data.patient_hash import patient_salt, salted_hash
from tasks.data.quarantine import DUPLICATE_SOP_UID, NO_LABEL
from tasks.errors import MedtransferError

logger = logging.getLogger(__name__)

IMAGE_FOLDER = "image_folder"
# A manifest row's key (not a manifest column): "dicom" or the image file's format.
KIND_KEY = "_kind"


def ingest_folder(
    folder: Path,
    labels: LabelSource,
    data: DataParams,
    seed: int,
    source_kind: str,
    progress: bool = True,
    decode_map: DecodeMap | None = None,
    group_names: tuple[str, ...] | None = None,
) -> IngestResult:
    """Decode every file under ``folder`` (with ``decode_map``, default a process pool; the
    members of archives among them, or of ``folder`` when it is one, as if extracted where
    they lie: :mod:`tasks.data.archives`) and write the processed dataset, with the grouping attributes ``group_names``
    (:func:`tasks.data.groups.recorded`; None: the header ones and ``data.site``'s).

    A ``dicom_folder`` whose kept images all come from PNG / JPEG / TIFF files is recorded as
    an ``image_folder``. An image file's patient is the labels CSV's ``patient`` column when
    it has one, else the file itself (the report's ``split_by``: ``patient`` or ``image``).

    Raises:
        MedtransferError: no file; an unreadable archive; a labels CSV none of whose rows
            names a file of ``folder``;
            what :func:`tasks.data.dataset_writer.write_dataset` refuses.
    """
    salt = patient_salt()
    names, outcomes = _listed_and_decoded(folder, labels, data, salt, decode_map)
    labels.match_bare_names(names)  # before any file is decoded (the outcomes are lazy)
    staging = staging_dir(data.processed_dir)
    try:
        with open(staging / "images.raw", "wb") as raw:
            rows, quarantine = _label_and_keep(
                tqdm(outcomes, total=len(names), desc="ingest", unit="file", disable=not progress),
                labels,
                raw,
                _group_columns(group_names, data.site),
                salt,
            )
        csv_counts = labels.check_rows_name_files(set(names))
        kind = _folder_kind(source_kind, rows)
        source = SourceYield(
            rows=rows,
            quarantine=quarantine,
            files_seen=len(names),
            ingested=len({row["source_file"] for row in rows}),
            kind=kind,
            name=data.name or kind,
            labels_from=ds_files.CSV_LABELS if labels.csv_path else ds_files.SUBFOLDER_LABELS,
            findings=list(labels.findings) if labels.findings else None,
        )
        result = write_dataset(staging, source, data, seed)
    except BaseException:
        # The next run would remove it too; removing it now keeps a long-lived process clean.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.labels_csv = csv_counts
    result.split_by = _split_unit(rows, labels)
    return result


def _listed_and_decoded(
    folder: Path, labels: LabelSource, data: DataParams, salt: str, decode_map: DecodeMap | None
) -> tuple[list[str], Iterable[FileOutcome]]:
    """Each file's path relative to ``folder`` (a folder, or an archive: its members), in
    order, and their outcomes (decoded lazily, as they are read). Archives, as ``folder`` or
    among its files, are read member by member (:mod:`tasks.data.archives`) and decoded by
    its own process pool, whatever ``decode_map`` is.

    Raises:
        MedtransferError: no file; an unreadable archive, or two entries with one path.
    """
    files = [folder] if folder.is_file() else list_files(folder, exclude=labels.csv_path)
    if not any(archives.is_archive(path) for path in files):
        if not files:
            raise MedtransferError(
                f"The folder {folder} holds no files. Point data.source at a folder of DICOM files."
            )
        names = [path.relative_to(folder).as_posix() for path in files]
        return names, (decode_map or decode_in_process_pool)(folder, files, data, salt)
    entries = archives.list_entries(folder, files)
    if not entries:
        raise MedtransferError(
            f"data.source {folder} holds no files (its archives hold none). Point data.source "
            "at DICOM files, as a folder or as ZIP / TAR archives."
        )
    if decode_map not in (None, decode_in_process_pool) and archives.has_members(entries):
        logger.warning(
            "ingest: data.source holds archives: their members are read and decoded by the "
            "ingest stage's own process pool (data.workers), not orchestration.task_runner"
        )
    return [entry.relative for entry in entries], archives.decode_entries(
        folder, entries, data, salt
    )


def _folder_kind(source_kind: str, rows: list[dict]) -> str:
    """``image_folder`` for a ``dicom_folder`` whose kept images all came from image files."""
    if source_kind == "dicom_folder" and rows and all(r[KIND_KEY] != "dicom" for r in rows):
        return IMAGE_FOLDER
    return source_kind


def _split_unit(rows: list[dict], labels: LabelSource) -> str:
    """``image`` when some kept image file had no patient (no ``patient`` column: each image
    is its own patient), else ``patient``."""
    images = [r for r in rows if r[KIND_KEY] != "dicom"]
    if images and not all(labels.patient_for(r["source_file"]) for r in images):
        return SPLIT_BY_IMAGE
    return SPLIT_BY_PATIENT


def _group_columns(names: tuple[str, ...] | None, site: str | None) -> Callable[[dict], dict]:
    """Header values (:func:`tasks.data.groups.header_groups`) → an image's ``group_*``
    manifest columns: ``names`` (None: :func:`tasks.data.groups.recorded` without the
    sensitive ones), ``site`` for the site."""
    chosen = groups.recorded((), site) if names is None else names
    return lambda values: groups.keep(values, chosen, site)


def _label_and_keep(
    outcomes: Iterable[FileOutcome],
    labels: LabelSource,
    raw: BinaryIO,
    group_columns: Callable[[dict], dict],
    salt: str,
) -> tuple[list[dict], list[dict]]:
    """Resolve each decoded file's label (and an image file's patient, salted with ``salt``)
    and append its images' bytes to ``raw``; returns the manifest rows of the kept images (with
    ``group_columns`` of the file's header values) and the quarantine rows of the rest, in
    file order.

    A file without a label is quarantined (``no_label``), and so is a file whose SOP Instance
    UID an earlier kept file had (``duplicate_sop_instance_uid``: the first one is kept).
    """
    rows: list[dict] = []
    quarantine: list[dict] = []
    seen_sop_uids: set[str] = set()
    for outcome in outcomes:
        label = _resolve_label(outcome, labels, seen_sop_uids)
        if outcome.reason:
            quarantine.append(
                {
                    "source_file": outcome.source_file,
                    "reason": outcome.reason,
                    "detail": outcome.detail,
                }
            )
            continue
        if outcome.sop_uid:
            seen_sop_uids.add(outcome.sop_uid)
        patient = labels.patient_for(outcome.source_file) if outcome.kind != "dicom" else None
        if patient:  # a DICOM file's header names its patient; an image file's CSV row may
            outcome.patient_hash = salted_hash(salt, f"patient:{patient}")
        for frame, image in enumerate(outcome.images):
            raw.write(image.tobytes())
            rows.append(
                {
                    CHANNELS_KEY: 1 if image.ndim == 2 else image.shape[0],
                    KIND_KEY: outcome.kind,
                    "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                    "source_file": outcome.source_file,
                    "frame": frame,
                    "label": label,
                    "patient_hash": outcome.patient_hash,
                    "sop_uid_hash": outcome.sop_uid_hash,
                    "notes": outcome.notes,
                    **group_columns(outcome.groups),
                    # a multi-label CSV's (K,) findings: labels.npy's row (NaN unknown)
                    **({"findings": labels.findings_of(label)} if labels.findings else {}),
                }
            )
    return rows, quarantine


def _resolve_label(
    outcome: FileOutcome, labels: LabelSource, seen_sop_uids: set[str]
) -> str | None:
    """The label of a decoded ``outcome``, or None after setting its quarantine reason (no label,
    or a SOP Instance UID in ``seen_sop_uids``). An outcome already quarantined stays so."""
    if outcome.reason:
        return None
    label = labels.label_for(outcome.source_file, outcome.sop_uid)
    if label is None:
        outcome.reason, outcome.detail = NO_LABEL, "no label for this file in the labels source"
    elif outcome.sop_uid and outcome.sop_uid in seen_sop_uids:
        outcome.reason = DUPLICATE_SOP_UID
        outcome.detail = "same SOPInstanceUID as an earlier file; the first one was kept"
    return label


def ingest_npz(
    path: Path,
    data: DataParams,
    seed: int,
    group_names: tuple[str, ...] | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingest a MedMNIST-format ``.npz`` keeping its official train/val/test split.

    Each image is its own "patient" (MedMNIST does not publish patient identities; its split
    is already patient-level). ``files_seen`` counts images here. Every array is checked
    (:func:`tasks.data.npz_source.check_npz`) before the staging folder exists, so a malformed
    archive is one error line and leaves nothing behind. Without headers, every grouping
    attribute but ``data.site`` is ``unknown``. ``progress``: a bar per split. Labels ``(N, K)``
    0/1 make a multi-label dataset of K findings (:func:`tasks.data.npz_source.npz_findings`).
    """
    split_labels = check_npz(path)
    findings = npz_findings(path, split_labels)  # None: one class per image
    salt = patient_salt()
    staging = staging_dir(data.processed_dir)
    with open(staging / "images.raw", "wb") as raw:
        rows = read_npz_rows(path, split_labels, data, salt, raw, progress, findings)
    to_columns = _group_columns(group_names, data.site)
    for row in rows:  # no headers: every attribute but the named site is unknown
        row.update(to_columns({}))
    source = SourceYield(
        rows=rows,
        quarantine=[],
        files_seen=len(rows),
        ingested=len(rows),
        kind="npz",
        name=data.name or "npz",
        labels_from=ds_files.NPZ_LABELS,
        findings=findings,
    )
    result = write_dataset(staging, source, data, seed)
    result.split_by = SPLIT_BY_SOURCE
    return result
