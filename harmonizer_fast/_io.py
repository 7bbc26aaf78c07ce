"""Atomic file writes shared by the workflows (checkpoints, caches, results, benchmarks): nothing half-written.

Every write goes through the ``os`` calls below (``os.write``, ``os.fsync``, ``os.replace``, ``os.unlink``), so
that a test can stop the process at any one of them and check what a kill at that instant leaves behind
(``tests/test_faults.py``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """An output path that cannot be written (a directory where a file is wanted, a parent that is a file, ...)."""


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is); given a file, its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _syncfs():
    """libc's ``syncfs``, or None off Linux. Looked up once: ``find_library`` runs ``ldconfig`` in a subprocess,
    which cost a fork per flushed work unit."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def sync_filesystem(path: PathLike) -> bool:
    """Flush every file written on the filesystem holding ``path`` with one call (Linux ``syncfs``); False where
    there is none, and the caller fsyncs file by file. One journal commit for a batch of files instead of one
    per file: ``predict`` writes about eight files per case."""
    import ctypes

    syncfs = _syncfs()
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))  # EIO: written data could not be stored
    finally:
        os.close(fd)
    return True


def temp_name(path: Path) -> Path:
    """The temporary name :func:`write_atomic` writes ``path`` under first (same folder, hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def check_not_input(out: PathLike, inputs: Iterable[Optional[PathLike]], what: str) -> None:
    """Outputs never land on inputs ([reliability] #36): ``out`` may be neither an input (by resolved path or by
    inode, so a hard link or a symlink counts) nor inside an input folder; :class:`OutputPathError` otherwise.
    The one check every command that reads and writes files makes before it starts."""
    o = Path(out).resolve()
    for src in inputs:
        if src is None or not os.path.exists(src):
            continue
        s = Path(src).resolve()
        if o == s or (s.is_dir() and s in o.parents) or (o.exists() and os.path.samefile(s, o)):
            raise OutputPathError(f"{what}: {out} is {'inside ' if o != s and s.is_dir() else ''}the input {src}; "
                                  "outputs never replace inputs: choose another path")  # fmt: skip


def check_output_file(path: PathLike, what: str, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """``path`` as a file this process may create or replace, and none of ``inputs``
    (:func:`check_not_input`); :class:`OutputPathError` naming ``what`` otherwise.

    Checked before any work is done, so a long computation never ends in an unwritable destination.
    """
    check_not_input(path, inputs, what)
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{what}: {p} is a directory; expected a file name")
    parent = p.parent
    for d in (parent, *parent.parents):
        if d.exists():
            if not d.is_dir():
                raise OutputPathError(f"{what}: cannot create {p}: {d} is a file, not a directory")
            if not os.access(d, os.W_OK | os.X_OK):
                raise OutputPathError(f"{what}: cannot create {p}: {d} is not writable")
            break
    return p


def check_output_dir(path: PathLike, what: str, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """``path`` as a directory this process may create or write into, and none of ``inputs`` nor inside one
    (:func:`check_not_input`); :class:`OutputPathError` otherwise."""
    check_not_input(path, inputs, what)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what}: {p} exists and is not a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what}: {p} is not writable")
        return p
    check_output_file(p, what)  # the nearest existing ancestor must be a writable directory
    return p


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to a temporary file in the same folder, flush it to disk, rename it into place and
    flush the folder: readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    view = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only target: one line naming the path (what the CLI prints)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            os.unlink(tmp)
    fsync_dir(path.parent)


def remove(path: PathLike) -> None:
    """Delete a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
