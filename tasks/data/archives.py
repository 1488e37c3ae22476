"""Archives in ``data.source``: ZIP and TAR files (``.tar.gz`` / ``.tgz`` too) read member by
member, as if each were extracted where it lies.

Why: DVC walks and hashes a dependency folder file by file, so ``dvc status`` on a
100,000-file ``data.source`` takes a minute and adding one file a 4-minute repro
(``benchmarks/results/scale.md``); as a few hundred archives (one per PACS export batch or day)
the same images are a few hundred files to DVC (treeverse/dvc#7681's advice).

What a member is called: ``data.source`` may be one archive (its members are the files, named
by their paths inside it) or a folder holding archives beside or instead of loose files; a
member ``normal/0001.dcm`` of ``<data.source>/batch-07/day.zip`` is the file
``batch-07/normal/0001.dcm``, what ``unzip`` there would give. So a labels CSV, class
sub-folders, the manifest's ``source_file`` and the dataset itself are those of the extracted
folder, byte for byte. Two entries with the same such path (a loose file and a member, or
members of two archives) are refused: their labels and rows could not be told apart.

Reading: nothing is extracted to disk. :func:`list_entries` reads each archive's directory
(ZIP's central directory; a TAR's headers, the whole stream for ``.tar.gz``), refusing a
truncated or unreadable archive with one line before anything is written. :func:`decode_entries`
then reads the members one at a time, in path order, in this process, and hands their bytes to
worker processes to decode (a bounded window in flight: memory does not grow with the archive).
A member declared larger than :data:`MAX_MEMBER_BYTES` is never read (``too_large``: a zip
bomb declares its inflated size), a member that does not inflate or fails its checksum is
``unreadable``, a link or device entry is ``unreadable`` without being followed; every member
is ingested or quarantined with a reason, as a file is. ``.tar.gz`` members are best stored in
name order (``tar --sort=name``): a gzip stream is read forwards only, and an earlier member
read later costs a re-read from the start.
"""

from __future__ import annotations

import gzip
import stat
import tarfile
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from multiprocessing.context import BaseContext
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tasks.config import DataParams
from tasks.data.channels import keeps_colour
from tasks.data.dicom_guards import MAX_IMAGE_DIM, decoded_bytes_limit
from tasks.data.dicom_rejections import TOO_LARGE, UNREADABLE
from tasks.data.file_decoding import (
    FileOutcome,
    chunk_size,
    decode_bytes_to_outcome,
    decode_to_outcome,
    pool_context,
)
from tasks.data.image_files import FILE_SLACK_BYTES
from tasks.errors import MedtransferError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# The most bytes of one member read into memory: what an image file may hold
# (tasks.data.image_files refuses a larger one unread); a larger DICOM file is read loose.
MAX_MEMBER_BYTES = 2 * decoded_bytes_limit(MAX_IMAGE_DIM) + FILE_SLACK_BYTES
# A well-formed TAR ends with two zero blocks; without them it was cut at a member's edge.
TAR_END = bytes(2 * tarfile.BLOCKSIZE)
_LISTING_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error)
# Bytes of members in one unit of decoding work, and read but not yet decoded at once: what the
# reading adds to memory, whatever the archives hold (a member alone may exceed either).
CHUNK_BYTES = 16 * 2**20
IN_FLIGHT_BYTES = 128 * 2**20
# Chunks in flight per worker, as the flow's fan-out keeps them (flows.fanout).
CHUNKS_PER_WORKER = 4


@dataclass(frozen=True, slots=True)  # slots: 100,000 entries in 23 MiB, not 27
class Entry:
    """One file to ingest: a loose file of the source, or an archive member.

    Attributes:
        relative: its path under ``data.source`` once extracted (POSIX separators).
        archive: the archive holding it; None for a loose file (``data.source / relative``).
        size: the member's declared size in bytes.
        locator: a ZIP member's place in its archive's directory, or a TAR member's data
            offset (no ``ZipInfo`` is kept: 100,000 of them held 50 MiB).
        skip: why the member is not read (a link or device entry), else "".
    """

    relative: str
    archive: Path | None = None
    size: int = 0
    locator: int = 0
    skip: str = ""


def is_archive(path: Path) -> bool:
    """Whether ``path``'s name ends like an archive ingestion reads (any case)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def list_entries(source: Path, files: list[Path]) -> list[Entry]:
    """The entries of ``files`` (``[source]`` when ``source`` is an archive, else the source
    folder's files), archives expanded into their members, sorted by path as
    :func:`tasks.data.file_decoding.list_files` sorts files.

    Raises:
        MedtransferError: an archive is truncated or unreadable, or two entries share a path
            (one line, no name quoted: names can be patient data).
    """
    archives = [path for path in files if is_archive(path)]
    entries: list[Entry] = []
    for path in files:
        if not is_archive(path):
            entries.append(Entry(path.relative_to(source).as_posix()))
            continue
        base = "" if path == source else path.parent.relative_to(source).as_posix()
        try:
            entries.extend(_members(path, "" if base == "." else base))
        except _LISTING_ERRORS as err:
            which = (
                "data.source"
                if path == source
                else f"Archive {archives.index(path) + 1} of {len(archives)} in data.source"
            )
            raise MedtransferError(_unreadable(which, err)) from err
    entries.sort(key=lambda entry: PurePosixPath(entry.relative).parts)
    _refuse_shared_paths(entries)
    return entries


def _unreadable(which: str, error: BaseException) -> str:
    """The refusal of an archive named by ``which`` (its place among the archives, in path
    order: its name may be patient data)."""
    return (
        f"{which} cannot be read as a ZIP or TAR archive ({type(error).__name__}: truncated, "
        "corrupt or not an archive; archives are taken by their name's suffix, "
        f"{', '.join(ARCHIVE_SUFFIXES)}). Copy it again or remove it; nothing was ingested and "
        "the previous dataset is unchanged."
    )


def _refuse_shared_paths(entries: list[Entry]) -> None:
    """Raise when two sorted ``entries`` have the same path once extracted."""
    shared = sum(a.relative == b.relative for a, b in pairwise(entries))
    if shared:
        raise MedtransferError(
            f"{shared} path(s) of data.source occur twice once its archives are read as if "
            "extracted where they lie (a loose file and an archive member, or members of two "
            "archives): their labels and manifest rows could not be told apart. Give each "
            "archive's members a folder of their own (e.g. the export's date) inside it."
        )


def _members(path: Path, base: str) -> Iterator[Entry]:
    """The file entries of the archive at ``path``, named under ``base`` (directories left
    out)."""
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        for number, info in enumerate(infos):
            if info.is_dir():
                continue
            # The Unix file type in the high bits; none (0) from other systems and writers
            link = stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG)
            yield Entry(_name(base, info.filename, number), path, info.file_size, number,
                        _LINK if link else "")  # fmt: skip
        return
    with tarfile.open(path, "r:*") as archive:
        infos = archive.getmembers()
        _check_tar_end(archive)
    for number, info in enumerate(infos):
        if info.isdir():
            continue
        skip = "" if info.isreg() and not info.issparse() else _LINK
        yield Entry(_name(base, info.name, number), path, info.size, info.offset_data, skip)


_LINK = "an archive entry that is a link, a device or a sparse file, not read (not followed)"


def _check_tar_end(archive: tarfile.TarFile) -> None:
    """Raise ``tarfile.ReadError`` unless the end-of-archive blocks follow the last member."""
    stream = archive.fileobj
    stream.seek(archive.offset)
    if stream.read(len(TAR_END)) != TAR_END:
        raise tarfile.ReadError("no end-of-archive blocks")


def _name(base: str, member: str, number: int) -> str:
    """The member's path once extracted under ``base``: empty, ``.`` and ``..`` parts and
    leading slashes dropped, as ``zipfile`` extracts (none leaves ``base``)."""
    parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    name = "/".join(parts) or f"unnamed-member-{number}"
    return f"{base}/{name}" if base else name


def has_members(entries: list[Entry]) -> bool:
    """Whether any entry is an archive member (else the folder is read as files are)."""
    return any(entry.archive is not None for entry in entries)


class MemberReader:
    """Reads entries' bytes in order, keeping each archive open from its first entry to its
    last (entries of several archives may interleave in path order)."""

    def __init__(self, source: Path, entries: list[Entry]) -> None:
        self.source = source
        self.last = {entry.archive: i for i, entry in enumerate(entries) if entry.archive}
        self.open: dict[Path, zipfile.ZipFile | BinaryIO] = {}

    def payload(self, index: int, entry: Entry) -> bytes | Path | FileOutcome:
        """The member's bytes, a loose file's path, or the outcome of a member not read."""
        if entry.archive is None:
            return self.source / entry.relative
        try:
            return self._read(entry)
        except MemberRefused as refused:
            return FileOutcome(source_file=entry.relative, reason=refused.reason,
                               detail=refused.detail)  # fmt: skip
        finally:
            if self.last[entry.archive] == index and entry.archive in self.open:
                self.open.pop(entry.archive).close()

    def _read(self, entry: Entry) -> bytes:
        if entry.skip:
            raise MemberRefused(UNREADABLE, entry.skip)
        if entry.size > MAX_MEMBER_BYTES:
            raise MemberRefused(
                TOO_LARGE,
                f"an archive member declaring {entry.size / 2**20:.0f} MiB, more than ingestion "
                f"reads from an archive ({MAX_MEMBER_BYTES / 2**20:.0f} MiB); not inflated",
            )
        try:
            handle = self.open.get(entry.archive)
            if handle is None:
                handle = self.open[entry.archive] = _open(entry.archive)
            data = _member_bytes(handle, entry)
        except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
                tarfile.TarError, zlib.error) as err:  # fmt: skip
            raise MemberRefused(
                UNREADABLE, f"the archive member does not read ({type(err).__name__})"
            ) from err
        if len(data) != entry.size:
            raise MemberRefused(UNREADABLE, "the archive member is shorter than it declares")
        return data

    def close(self) -> None:
        """Close what is still open (an interrupted read)."""
        for handle in self.open.values():
            handle.close()
        self.open.clear()


class MemberRefused(Exception):
    """A member that is not read: its quarantine ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _open(path: Path) -> zipfile.ZipFile | BinaryIO:
    """A ZIP archive, or a TAR's byte stream (gzip-decompressed when it is compressed)."""
    if path.name.lower().endswith(".zip"):
        return zipfile.ZipFile(path)
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    # Closed by MemberReader; gzip.open owns its file (a GzipFile given one would not close it).
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _member_bytes(handle: zipfile.ZipFile | BinaryIO, entry: Entry) -> bytes:
    """At most ``entry.size`` bytes of the member (ZIP checks its CRC on the last read)."""
    if isinstance(handle, zipfile.ZipFile):
        with handle.open(handle.infolist()[entry.locator]) as member:
            return member.read(entry.size + 1)
    handle.seek(entry.locator)
    return handle.read(entry.size)


# One entry to decode: its path once extracted, and its bytes, a loose file's path or the
# outcome of a member not read.
Job = tuple[str, bytes | Path | FileOutcome]


def decode_entries(
    source: Path, entries: list[Entry], data: DataParams, salt: str
) -> Iterator[FileOutcome]:
    """One outcome per entry, in order: members read here one at a time
    (:class:`MemberReader`), decoded in ``data.workers`` worker processes in chunks of
    :func:`tasks.data.file_decoding.chunk_size` entries (and at most :data:`CHUNK_BYTES`), at
    most :data:`IN_FLIGHT_BYTES` of them read ahead.

    Not a generator itself: the pool's start method is chosen now, before the caller's
    progress bar starts its monitor thread.
    """
    args = (source, data.image_size, data.multiframe, salt, keeps_colour(data))
    workers = data.worker_count
    reader = MemberReader(source, entries)
    jobs = ((entry.relative, reader.payload(i, entry)) for i, entry in enumerate(entries))
    if workers == 1 or len(entries) < 8:
        return _closing(reader, (_decode_job(job, args) for job in jobs))
    chunks = _chunks(jobs, chunk_size(len(entries), workers))
    return _closing(reader, _pooled(chunks, args, workers, pool_context()))


def _closing(reader: MemberReader, outcomes: Iterator[FileOutcome]) -> Iterator[FileOutcome]:
    try:
        yield from outcomes
    finally:
        reader.close()


def _chunks(jobs: Iterable[Job], most: int) -> Iterator[list[Job]]:
    """Consecutive ``jobs`` in lists of at most ``most``, cut early at :data:`CHUNK_BYTES`."""
    chunk: list[Job] = []
    for job in jobs:
        chunk.append(job)
        if len(chunk) >= most or _bytes(chunk) >= CHUNK_BYTES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _bytes(chunk: list[Job]) -> int:
    return sum(len(payload) for _, payload in chunk if isinstance(payload, bytes))


def _pooled(
    chunks: Iterator[list[Job]], args: tuple, workers: int, context: BaseContext
) -> Iterator[FileOutcome]:
    """Each chunk decoded in a worker process, outcomes in order, with at most
    ``CHUNKS_PER_WORKER * workers`` chunks and :data:`IN_FLIGHT_BYTES` submitted and not
    yet consumed (one chunk always may be)."""
    window = CHUNKS_PER_WORKER * workers
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[tuple[Future, int]] = deque()
        in_flight = 0
        for chunk in chunks:
            size = _bytes(chunk)
            while pending and (len(pending) >= window or in_flight + size > IN_FLIGHT_BYTES):
                future, done = pending.popleft()
                in_flight -= done
                yield from future.result()
            pending.append((pool.submit(_decode_chunk, chunk, args), size))
            in_flight += size
        while pending:
            yield from pending.popleft()[0].result()


def _decode_chunk(chunk: list[Job], args: tuple) -> list[FileOutcome]:
    return [_decode_job(job, args) for job in chunk]


def _decode_job(job: Job, args: tuple) -> FileOutcome:
    """The outcome of one entry: decoded from its bytes or its file, or already decided."""
    relative, payload = job
    source, *settings = args
    if isinstance(payload, FileOutcome):
        return payload
    if isinstance(payload, bytes):
        return decode_bytes_to_outcome(payload, relative, *settings)
    return decode_to_outcome(payload, source, *settings)
