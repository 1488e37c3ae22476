"""Outputs written whole or not at all: files through a unique temporary name, folders
through a staging sibling swapped in by renames.

A process killed at any instant (SIGKILL, power cut of the process, OOM killer) leaves either
the previous output or the new one at the output's path, never a mixture. What it leaves
beside it (a staging folder, the previous folder set aside, a partial file) is named after
the output, so the next writer recognises it: :func:`recover_folder` restores a folder set
aside when the swap was cut between its two renames, and removes the rest, so nothing
accumulates.

One writer per output at a time: a second writer that starts while one runs removes the
first's staging folder, and the first then fails loudly (it never swaps in a mixture).

A stage writes several outputs (a dataset and its report, a model and its report): it calls
:func:`check_can_write` with all of them before it replaces any, so a disk that refuses one
(read-only, full, a file standing where a folder belongs) leaves every old output in place,
still agreeing with each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

PROBE_PREFIX = ".medtransfer-probe-"
STAGING_MARK = ".staging"
ASIDE_MARK = ".aside-"
PARTIAL_SUFFIX = ".partial"
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two existing paths in one step
_AT_FDCWD = -100  # paths relative to the working directory


def recover_folder(target: Path) -> None:
    """Undo what an interrupted :func:`swap_in_folder` left beside ``target``.

    If ``target`` is missing but a copy set aside exists (killed between the two renames of
    the fallback swap), that copy goes back to ``target``. Every other staging folder and
    set-aside copy of ``target`` is removed.
    """
    if not target.parent.is_dir():
        return
    leftovers = sorted(
        (
            path
            for path in target.parent.iterdir()
            if path.name.startswith(target.name + STAGING_MARK)
            or path.name.startswith(target.name + ASIDE_MARK)
        ),
        key=lambda path: path.name,
    )
    if not target.exists():
        aside = [path for path in leftovers if path.name.startswith(target.name + ASIDE_MARK)]
        if aside:
            os.rename(aside[0], target)
            leftovers.remove(aside[0])
    for path in leftovers:
        _remove(path)


def new_staging_folder(target: Path) -> Path:
    """A fresh, empty folder beside ``target`` (``<name>.staging-<random>``) to write the
    next version of ``target`` into; its unique name means two writers never share one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{target.name}{STAGING_MARK}-", dir=target.parent))


def swap_in_folder(staging: Path, target: Path) -> None:
    """Make the complete folder ``staging`` the new ``target``; the previous one is deleted.

    Where the file system can exchange two paths in one step (Linux ``renameat2``), a reader
    of ``target`` sees the old folder or the new one at every instant. Elsewhere the old
    folder is renamed aside first and the new one renamed in: a kill between the two leaves
    no ``target`` for a moment, and :func:`recover_folder` at the next start puts the old one
    back.
    """
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        _remove(staging)  # now holds the previous version
        return
    aside = target.with_name(f"{target.name}{ASIDE_MARK}{secrets.token_hex(8)}")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write`` fills a unique temporary file beside it, which is
    flushed to disk and renamed over ``path``. Returns ``path``.

    The temporary name (``.<name>.<random>.partial``) cannot collide with another writer's;
    it is removed when ``write`` fails, and partial files a killed writer left are removed
    before writing, so they never accumulate.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())  # the bytes are on disk before the name points at them
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return path


def check_can_write(files: Iterable[Path] = (), folders: Iterable[Path] = ()) -> None:
    """Refuse, before anything is replaced, outputs the disk would not take.

    Args:
        files: files a stage will write (through :func:`write_file`): each must not be a
            folder, and its folder (or the nearest part of it that exists) must take a new file.
        folders: folders a stage will fill or swap in (through :func:`swap_in_folder`): each
            must not be a file, and it (or the nearest part of it that exists) must take a new
            file.

    Raises:
        OSError: the first refusal, as the disk would give it later, with the path: ``EISDIR``
            (a folder where a file belongs), ``ENOTDIR`` (a file where a folder belongs), or
            the probe's own error (``EROFS``, ``EACCES``, ``ENOSPC``...). The command line and
            the flow turn it into one line naming the stage and what to do
            (:func:`tasks.errors.stage_io_error`); it is not retried.
    """
    checks = [(path, path.parent, True) for path in map(Path, files)]
    checks += [(path, path, False) for path in map(Path, folders)]
    for path, folder, is_file in checks:
        if is_file and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        try:
            _probe(existing)
        except OSError as err:
            raise OSError(err.errno, err.strerror or str(err), str(existing)) from err


def _probe(folder: Path) -> None:
    """Create, fill, flush and remove a small file in ``folder``: a read-only or full disk
    refuses one of these steps."""
    handle, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    try:
        os.write(handle, b"\0" * 4096)
        os.fsync(handle)
    finally:
        os.close(handle)
        os.unlink(name)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot (then nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    # Any failure (a file system without exchange: EINVAL) leaves both paths as they were.
    return (
        renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        == 0
    )


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2`` (Linux, glibc 2.28+), or None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
