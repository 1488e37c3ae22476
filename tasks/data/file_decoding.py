"""Decoding a folder's files into outcomes: images, or a quarantine reason, one per file.

A file that starts like a PNG, JPEG or TIFF (:func:`tasks.data.image_files.image_format`) is
decoded as an image file, pixels only; every other file as DICOM. Both fail with the same
reason codes (:mod:`tasks.data.dicom_rejections`).

:func:`decode_to_outcome` decodes one file (never raising: a failure is a reason);
:func:`decode_in_process_pool` is the default :data:`DecodeMap`, which runs it in worker
processes and keeps the file order; :func:`decode_chunk` and :func:`split_in_chunks` are the
units the Prefect flow fans out instead (``flows.fanout``).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import DataParams
from tasks.data import dicom_io, dicom_read, dicom_rejections, groups, image_files
from tasks.data.channels import keeps_colour
from tasks.data.patient_hash import salted_hash
from tasks.data.preprocess import resize_any


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
    # every header grouping attribute (tasks.data.groups.header_groups); ingestion keeps
    # the ones it records
    groups: dict[str, str] = field(default_factory=dict)
    # "dicom", or the image file's format ("png", "jpeg", "tiff"): an image file has no
    # patient of its own (its patient_hash is its file's until a labels CSV names one)
    kind: str = "dicom"


# Decodes ``files`` (under ``folder``) with the ``data`` settings and the patient salt, and
# yields one outcome per file in the order of ``files``.
DecodeMap = Callable[[Path, list[Path], DataParams, str], Iterable[FileOutcome]]


def list_files(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every regular file under ``folder`` (any depth), sorted, except ``exclude``."""
    exclude = exclude.resolve() if exclude else None
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() != exclude)


def decode_to_outcome(
    path: Path, folder: Path, image_size: int, multiframe: str, salt: str, colour: bool = False
) -> FileOutcome:
    """Decode one file into resized uint8 images (``(S, S)``, or ``(3, S, S)`` for a colour
    file when ``colour``), or a quarantine reason. Never raises."""
    outcome = FileOutcome(source_file=path.relative_to(folder).as_posix())
    return _decode_into(outcome, path, image_size, multiframe, salt, colour)


def decode_bytes_to_outcome(
    data: bytes, source_file: str, image_size: int, multiframe: str, salt: str, colour: bool = False
) -> FileOutcome:
    """:func:`decode_to_outcome` for a file's bytes already read (an archive member, named
    ``source_file`` as if extracted: :mod:`tasks.data.archives`). Never raises."""
    return _decode_into(FileOutcome(source_file=source_file), data, image_size, multiframe, salt,
                        colour)  # fmt: skip


def _decode_into(
    outcome: FileOutcome,
    source: Path | bytes,
    image_size: int,
    multiframe: str,
    salt: str,
    colour: bool,
) -> FileOutcome:
    """``outcome`` with the images (or the reason) of the file at ``source`` or of its bytes."""
    on_disk = not isinstance(source, bytes)
    kind = image_files.file_format(source) if on_disk else image_files.head_format(source[:132])
    if kind is not None:
        outcome.kind = kind
        return _image_outcome(source, outcome, image_size, salt, colour)
    try:
        with _pydicom_warnings_silenced():
            # dicom_io.decode_file's two steps, keeping the header for the grouping attributes
            ds = dicom_read.read_dataset(source if on_disk else io.BytesIO(source))
            decoded = dicom_io.decode_dataset(ds, multiframe=multiframe, colour=colour)
            outcome.groups = groups.header_groups(ds)
        outcome.images = [resize_any(frame, image_size) for frame in decoded.frames]
    except Exception as err:  # a decoder bug must not stop the run: the file is quarantined
        return _quarantined(outcome, err)
    outcome.sop_uid = decoded.sop_instance_uid
    outcome.sop_uid_hash = (
        salted_hash(salt, decoded.sop_instance_uid) if decoded.sop_instance_uid else ""
    )
    outcome.patient_hash = salted_hash(salt, decoded.patient_key or f"file:{outcome.source_file}")
    outcome.notes = ";".join(decoded.notes)
    return outcome


def _quarantined(outcome: FileOutcome, error: Exception) -> FileOutcome:
    """``outcome`` with the reason a decoder gave (:class:`DicomRejected`), or
    ``decode_failed`` for any other error, named by its type only: a decoder's text can quote
    attribute values (patient data)."""
    if isinstance(error, dicom_rejections.DicomRejected):
        outcome.reason, outcome.detail = error.reason, error.detail
    else:
        outcome.reason = dicom_rejections.DECODE_FAILED
        outcome.detail = f"unexpected {type(error).__name__}"
    return outcome


def _image_outcome(
    source: Path | bytes, outcome: FileOutcome, image_size: int, salt: str, colour: bool
) -> FileOutcome:
    """:func:`decode_to_outcome` for a PNG / JPEG / TIFF file (at ``source`` or its bytes):
    its pixels resized, or a reason. Its patient is its own file (each image its own patient)
    until a labels CSV names one."""
    try:
        if not isinstance(source, bytes):
            frame = image_files.decode_image_file(source, colour=colour)
        else:
            frame = image_files.decode_image_bytes(source, colour=colour)
        outcome.images = [resize_any(frame, image_size)]
    except Exception as err:  # a decoder bug must not stop the run: the file is quarantined
        return _quarantined(outcome, err)
    outcome.patient_hash = salted_hash(salt, f"file:{outcome.source_file}")
    outcome.notes = outcome.kind
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


def decode_chunk(
    folder: Path,
    paths: list[Path],
    image_size: int,
    multiframe: str,
    salt: str,
    colour: bool = False,
) -> list[FileOutcome]:
    """:func:`decode_to_outcome` for each of ``paths``, in order: one unit of fanned-out work."""
    return [decode_to_outcome(path, folder, image_size, multiframe, salt, colour) for path in paths]


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
    args = (folder, data.image_size, data.multiframe, salt, keeps_colour(data))
    if workers == 1 or len(files) < 8:
        return (decode_to_outcome(path, *args) for path in files)
    return _pool_map(files, args, workers, pool_context())


def pool_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: fork when this process runs no other thread, else from a
    fork server. Fork is fastest, but forking a process that runs other threads (Prefect's,
    for one) can deadlock on a lock held by another thread."""
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tasks.data.file_decoding"])
    return context


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
