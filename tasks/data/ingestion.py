"""Ingestion: a DICOM folder, a MedMNIST ``.npz`` or the synthetic set → processed dataset.

Every input file ends either in the dataset or in ``quarantine.csv`` with a reason, so
``ingested + quarantined == files_seen`` always holds. Files are decoded in parallel worker
processes; the parent keeps the sorted file order, so the output is byte-identical for the same
input and parameters. The dataset is first written to a staging folder and swapped into place
at the end (:mod:`tasks.atomic`): an interrupted run leaves the previous dataset or the new
one, never a half-written one or none.

The stage's entry point is :func:`tasks.stages.ingest.run_ingest`; this module is the work:
:func:`ingest_folder` and :func:`ingest_npz` build the dataset and return its counts.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import threading
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tasks import atomic
from tasks.config import DataParams
from tasks.data import dataset as ds_files
from tasks.data import dicom_io, dicom_rejections
from tasks.data.labels import LabelSource
from tasks.data.preprocess import resize_display, uint8_to_display
from tasks.data.splits import patient_level_split
from tasks.errors import MedtransferError

NO_LABEL = "no_label"
DUPLICATE_SOP_UID = "duplicate_sop_instance_uid"
QUARANTINE_REASONS = (
    dicom_rejections.NOT_DICOM,
    dicom_rejections.UNREADABLE,
    dicom_rejections.NO_PIXEL_DATA,
    dicom_rejections.UNSUPPORTED_TRANSFER_SYNTAX,
    dicom_rejections.UNSUPPORTED_IMAGE,
    dicom_rejections.DECODE_FAILED,
    dicom_rejections.TOO_LARGE,
    NO_LABEL,
    DUPLICATE_SOP_UID,
)
SALT_ENV = "MEDTRANSFER_PATIENT_SALT"
SALT_FILE = Path("data/.patient_salt")


@dataclass
class FileOutcome:
    """What decoding one file produced: images, or a quarantine reason."""

    source_file: str
    images: list[np.ndarray] = field(default_factory=list)
    reason: str = ""
    detail: str = ""
    sop_uid: str = ""
    sop_uid_hash: str = ""
    patient_hash: str = ""
    notes: str = ""


# Decodes ``files`` (under ``folder``) with the ``data`` settings and the patient salt, and
# yields one outcome per file in the order of ``files``.
DecodeMap = Callable[[Path, list[Path], DataParams, str], Iterable[FileOutcome]]


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
    # A labels CSV's row counts (LabelSource.csv_counts); empty for other label sources.
    labels_csv: dict[str, int] = field(default_factory=dict)

    def to_report(self) -> dict:
        return {
            "source_kind": self.source_kind,
            "files_seen": self.files_seen,
            "ingested": self.ingested,
            "quarantined": self.quarantined,
            "images": self.images,
            "quarantined_by_reason": self.quarantined_by_reason,
            "splits": self.splits,
            "classes": self.classes,
            **({"labels_csv": self.labels_csv} if self.labels_csv else {}),
        }


def ingest_folder(
    folder: Path,
    labels: LabelSource,
    data: DataParams,
    seed: int,
    source_kind: str,
    progress: bool = True,
    decode_map: DecodeMap | None = None,
) -> IngestResult:
    """Decode every file under ``folder`` (with ``decode_map``, default a process pool) and
    write the processed dataset."""
    files = list_files(folder, exclude=labels.csv_path)
    if not files:
        raise MedtransferError(
            f"The folder {folder} holds no files. Point data.source at a folder of DICOM files."
        )
    salt = patient_salt()
    staging = _staging_dir(data.processed_dir)
    try:
        rows, quarantine = _decode_into(
            staging / "images.raw", folder, files, labels, data, salt, progress, decode_map
        )
        ingested_files = len({row["source_file"] for row in rows})
        labels_from = ds_files.CSV_LABELS if labels.csv_path else ds_files.SUBFOLDER_LABELS
        result = _finish(
            staging,
            rows,
            quarantine,
            data,
            seed,
            source_kind,
            files_seen=len(files),
            ingested=ingested_files,
            origin=(data.name or source_kind, labels_from),
        )
    except BaseException:
        # The next run would remove it too; removing it now keeps a long-lived process clean.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.labels_csv = labels.csv_counts({f.relative_to(folder).as_posix() for f in files})
    return result


def _decode_into(
    raw_path: Path,
    folder: Path,
    files: list[Path],
    labels: LabelSource,
    data: DataParams,
    salt: str,
    progress: bool,
    decode_map: DecodeMap | None,
) -> tuple[list[dict], list[dict]]:
    """Decode ``files``, append each kept image's bytes to ``raw_path``; returns the manifest
    rows of the kept images and the quarantine rows of the rest, in file order."""
    rows: list[dict] = []
    quarantine: list[dict] = []
    seen_sop_uids: set[str] = set()
    with open(raw_path, "wb") as raw:
        outcomes = (decode_map or decode_in_process_pool)(folder, files, data, salt)
        for outcome in tqdm(
            outcomes, total=len(files), desc="ingest", unit="file", disable=not progress
        ):
            if not outcome.reason:
                label = labels.label_for(outcome.source_file, outcome.sop_uid)
                if label is None:
                    outcome.reason, outcome.detail = (
                        NO_LABEL,
                        "no label for this file in the labels source",
                    )
                elif outcome.sop_uid and outcome.sop_uid in seen_sop_uids:
                    outcome.reason = DUPLICATE_SOP_UID
                    outcome.detail = (
                        "same SOPInstanceUID as an earlier file; the first one was kept"
                    )
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
            for frame, image in enumerate(outcome.images):
                raw.write(image.tobytes())
                rows.append(
                    {
                        "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                        "source_file": outcome.source_file,
                        "frame": frame,
                        "label": label,
                        "patient_hash": outcome.patient_hash,
                        "sop_uid_hash": outcome.sop_uid_hash,
                        "notes": outcome.notes,
                    }
                )
    return rows, quarantine


def ingest_npz(path: Path, data: DataParams, seed: int) -> IngestResult:
    """Ingest a MedMNIST-format ``.npz`` keeping its official train/val/test split.

    Each image is its own "patient" (MedMNIST does not publish patient identities; its split
    is already patient-level). ``files_seen`` counts images here. Every array is checked
    (:func:`check_npz`) before the staging folder exists, so a malformed archive is one
    error line and leaves nothing behind.
    """
    split_labels = check_npz(path)
    salt = patient_salt()
    staging = _staging_dir(data.processed_dir)
    rows: list[dict] = []
    with np.load(path) as archive, open(staging / "images.raw", "wb") as raw:
        for split in ds_files.SPLITS:
            images, labels = archive[f"{split}_images"], split_labels[split]
            for i in tqdm(range(len(images)), desc=f"ingest {split}", unit="img", leave=False):
                display = uint8_to_display(images[i])
                if display.ndim == 3:  # RGB MedMNIST sets
                    display = display @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                image = resize_display(display, data.image_size)
                raw.write(image.tobytes())
                rows.append(
                    {
                        "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                        "source_file": f"{path.name}:{split}_images[{i}]",
                        "frame": 0,
                        "label": str(labels[i]),
                        "patient_hash": _salted_hash(salt, f"npz:{split}:{i}"),
                        "sop_uid_hash": "",
                        "notes": "npz",
                        "split": split,
                    }
                )
    return _finish(
        staging,
        rows,
        [],
        data,
        seed,
        "npz",
        files_seen=len(rows),
        ingested=len(rows),
        origin=(data.name or "npz", ds_files.NPZ_LABELS),
    )


def check_npz(path: Path) -> dict[str, np.ndarray]:
    """Check a MedMNIST-format archive without writing anything; returns each split's labels.

    The image arrays are checked from their ``.npy`` headers alone (shape and dtype), so a large
    archive is not decompressed twice; the label arrays are small and read in full.

    Returns:
        ``{split: int64 labels of shape (N,)}`` for ``train``, ``val`` and ``test``.

    Raises:
        MedtransferError: one line naming the archive, the array and what is wrong: a missing
            or unreadable array, an object (pickled) array, images that are not uint8
            ``(N, H, W)`` or ``(N, H, W, 3)``, an empty split, labels of another length than
            the images, several labels per image, or labels that are not whole numbers.
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
    if labels.shape[1] != 1:
        raise MedtransferError(
            f"{path} has {labels.shape[1]} labels per image in {key} (multi-label); medtransfer "
            "trains single-label classifiers. Use a single-label MedMNIST set."
        )
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


def list_files(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every regular file under ``folder`` (any depth), sorted, except ``exclude``."""
    exclude = exclude.resolve() if exclude else None
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() != exclude)


def decode_to_outcome(
    path: Path, folder: Path, image_size: int, multiframe: str, salt: str
) -> FileOutcome:
    """Decode one file into resized uint8 images, or a quarantine reason. Never raises."""
    outcome = FileOutcome(source_file=path.relative_to(folder).as_posix())
    try:
        with _pydicom_warnings_silenced():
            decoded = dicom_io.decode_file(path, multiframe=multiframe)
        outcome.images = [resize_display(frame, image_size) for frame in decoded.frames]
    except dicom_rejections.DicomRejected as err:
        outcome.reason, outcome.detail = err.reason, err.detail
        return outcome
    except Exception as err:  # a decoder bug must not stop the run: the file is quarantined
        outcome.reason = dicom_rejections.DECODE_FAILED
        # The error's type only: a decoder's text can quote attribute values (patient data).
        outcome.detail = f"unexpected {type(err).__name__}"
        return outcome
    outcome.sop_uid = decoded.sop_instance_uid
    outcome.sop_uid_hash = (
        _salted_hash(salt, decoded.sop_instance_uid) if decoded.sop_instance_uid else ""
    )
    outcome.patient_hash = _salted_hash(salt, decoded.patient_key or f"file:{outcome.source_file}")
    outcome.notes = ";".join(decoded.notes)
    return outcome


@contextlib.contextmanager
def _pydicom_warnings_silenced() -> Iterator[None]:
    """Silence warnings while one file is decoded: pydicom warns about every oddity it
    tolerates, and one line per file drowns the log.

    ``warnings.catch_warnings`` swaps process-wide state and is not thread-safe, so only the
    main thread uses it; a caller that decodes in threads holds one for all of them
    (``flows.fanout``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def patient_salt() -> str:
    """The secret salt for patient hashes: ``$MEDTRANSFER_PATIENT_SALT``, else a local file.

    The file (``data/.patient_salt``, never committed) is created with a random value on first
    use, so hashes are stable on one machine but cannot be reversed by whoever reads the repo.
    """
    from_env = os.environ.get(SALT_ENV)
    if from_env:
        return from_env
    if not SALT_FILE.is_file():
        SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        SALT_FILE.write_text(secrets.token_hex(16))
    return SALT_FILE.read_text().strip()


def _salted_hash(salt: str, value: str) -> str:
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def decode_chunk(
    folder: Path, paths: list[Path], image_size: int, multiframe: str, salt: str
) -> list[FileOutcome]:
    """:func:`decode_to_outcome` for each of ``paths``, in order: one unit of fanned-out work."""
    return [decode_to_outcome(path, folder, image_size, multiframe, salt) for path in paths]


def chunk_size(n_files: int, workers: int, max_chunk: int = 32) -> int:
    """Files per unit of fanned-out work: about four units per worker, at most ``max_chunk``.

    Several units per worker even out slow files; units of many files keep the per-unit
    overhead (a process hop, a Prefect task run) small against the decoding itself.
    """
    return max(1, min(max_chunk, n_files // (max(workers, 1) * 4)))


def split_in_chunks(files: list[Path], workers: int) -> list[list[Path]]:
    """Consecutive chunks of ``files`` of :func:`chunk_size` each, in order."""
    size = chunk_size(len(files), workers)
    return [files[i : i + size] for i in range(0, len(files), size)]


def decode_in_process_pool(
    folder: Path, files: list[Path], data: DataParams, salt: str
) -> Iterator[FileOutcome]:
    """The default :data:`DecodeMap`: files in order, in worker processes when more than one
    is configured (``data.workers``, 0 = one per core).

    Not a generator itself: the pool's start method is chosen now, before the caller's
    progress bar starts its monitor thread.
    """
    workers = data.worker_count
    args = (folder, data.image_size, data.multiframe, salt)
    if workers == 1 or len(files) < 8:
        return (decode_to_outcome(path, *args) for path in files)
    # Fork is fastest, but forking a process that runs other threads (Prefect's, for one) can
    # deadlock on a lock held by another thread; then start workers from a fork server instead.
    if threading.active_count() == 1:
        context = multiprocessing.get_context("fork")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tasks.data.dicom_io", "tasks.data.preprocess"])
    return _pool_map(files, args, workers, context)


def _pool_map(
    files: list[Path], args: tuple, workers: int, context: multiprocessing.context.BaseContext
) -> Iterator[FileOutcome]:
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(
            _decode_star,
            [(path, *args) for path in files],
            chunksize=chunk_size(len(files), workers),
        )


def _decode_star(job: tuple) -> FileOutcome:
    return decode_to_outcome(*job)


def _staging_dir(processed_dir: str) -> Path:
    """A fresh staging folder beside ``processed_dir`` to write the next dataset into.

    First undoes what an interrupted run left (:func:`tasks.atomic.recover_folder`): a
    dataset set aside mid-swap goes back in place, old staging folders are removed, so they
    never accumulate.
    """
    processed = Path(processed_dir)
    atomic.recover_folder(processed)
    return atomic.new_staging_folder(processed)


def _finish(
    staging: Path,
    rows: list[dict],
    quarantine: list[dict],
    data: DataParams,
    seed: int,
    source_kind: str,
    files_seen: int,
    ingested: int,
    origin: tuple[str, str],
) -> IngestResult:
    """Check classes, split, write every file of the dataset, swap it into place, count.

    ``origin``: the dataset's name (``data.name`` or the source kind, never a path) and where
    its labels came from, in words; with the counts and a content digest they become the
    dataset's source record.
    """
    if ingested + len(quarantine) != files_seen:  # the stage's core promise, checked first
        raise AssertionError(f"accounting broken: {ingested} + {len(quarantine)} != {files_seen}")
    reasons = Counter(item["reason"] for item in quarantine)
    classes = _classes(rows, reasons, files_seen, staging)
    class_index = {name: i for i, name in enumerate(classes)}
    labels = np.array([class_index[row["label"]] for row in rows], dtype=np.int64)
    if source_kind != "npz":  # a MedMNIST archive keeps its official split
        splits = patient_level_split(
            [row["patient_hash"] for row in rows],
            labels,
            data.val_fraction,
            data.test_fraction,
            seed,
        )
        for row, split in zip(rows, splits, strict=True):
            row["split"] = split
    _write_images(staging, len(rows), data.image_size)
    np.save(staging / ds_files.LABELS_FILE, labels)
    for index, row in enumerate(rows):
        row["index"], row["label_index"] = index, class_index[row["label"]]
    _write_csv(staging / ds_files.MANIFEST_FILE, ds_files.MANIFEST_COLUMNS, rows)
    _write_csv(staging / ds_files.QUARANTINE_FILE, ds_files.QUARANTINE_COLUMNS, quarantine)
    split_counts = _split_counts(rows, classes)
    source = ds_files.DatasetSource(
        kind=source_kind,
        name=origin[0],
        labels=origin[1],
        content_sha256=ds_files.content_digest(rows),
        files_seen=files_seen,
        ingested=ingested,
        quarantined=len(quarantine),
        images=len(rows),
        image_size=data.image_size,
        multiframe=data.multiframe,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
    )
    info = {
        "classes": classes,
        "image_size": data.image_size,
        "source_kind": source_kind,
        "multiframe": data.multiframe,
        "images": len(rows),
        "splits": split_counts,
        ds_files.SOURCE_KEY: source.to_info(),
    }
    (staging / ds_files.INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # Swapped in whole: a kill at any point leaves the previous dataset or this one.
    atomic.swap_in_folder(staging, Path(data.processed_dir))
    return IngestResult(
        processed_dir=Path(data.processed_dir),
        source_kind=source_kind,
        files_seen=files_seen,
        ingested=ingested,
        quarantined=len(quarantine),
        images=len(rows),
        quarantined_by_reason={reason: reasons.get(reason, 0) for reason in QUARANTINE_REASONS},
        splits=split_counts,
        classes={name: int((labels == i).sum()) for name, i in class_index.items()},
    )


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


def _write_images(staging: Path, count: int, size: int) -> None:
    """``images.raw`` (``count`` images of ``size`` x ``size`` bytes, in order) becomes
    ``images.npy``, copied in blocks so memory stays flat whatever the number of images."""
    images = np.lib.format.open_memmap(
        staging / ds_files.IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(count, size, size)
    )
    block = 1024
    with open(staging / "images.raw", "rb") as raw:
        for start in range(0, count, block):
            n = min(block, count - start)
            images[start : start + n] = np.frombuffer(
                raw.read(n * size * size), dtype=np.uint8
            ).reshape(n, size, size)
    images.flush()
    del images
    (staging / "images.raw").unlink()


def _split_counts(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    """Per split: images, patients and images of each class."""
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
