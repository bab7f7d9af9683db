"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A file is written to a hidden temporary sibling (``.<name>.tmp-<host>-<pid>-<random>``), flushed
to disk, then renamed over the target, and the directory entry is flushed too. A process killed
mid-write leaves only its temporary file behind: no glob of the project matches it (the name
starts with a dot and does not end in the target's suffix), and the next write of the same target
removes it once its writer is gone (:func:`remove_stale_temporaries`). Temporary files of live
writers are never touched, so concurrent writers of one target do not break each other.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

TEMPORARY_MARK = ".tmp-"
STALE_AFTER_SECONDS = 24 * 3600.0  # a temporary file this old is stale whoever wrote it

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def temporary_sibling(path: Path) -> Path:
    """A unique name in the same directory (same filesystem, so rename is atomic), hidden from globs.

    The name carries this host and process id, so a later writer can tell a stale temporary file
    (its process is gone) from one that is being written right now.
    """
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")


def temporaries_of(path: Path) -> list[Path]:
    """Temporary siblings of ``path`` on disk (of any writer, live or dead)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{_glob_escape(path.name)}{TEMPORARY_MARK}*"))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary siblings of ``path`` left by writers that died; returns what was removed.

    A temporary file is stale when its writer's process (on this host) no longer exists, or when
    it is older than a day whoever wrote it. Files of live writers are left alone.
    """
    removed = []
    for candidate in temporaries_of(path):
        if _is_stale(candidate):
            try:
                candidate.unlink()
            except FileNotFoundError:  # another writer cleaned it up first
                continue
            removed.append(candidate)
    return removed


def _is_stale(candidate: Path) -> bool:
    try:
        age = time.time() - candidate.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_SECONDS:
        return True
    owner = candidate.name.rpartition(TEMPORARY_MARK)[2].split("-")
    if len(owner) != 3 or owner[0] != _HOST or not owner[1].isdigit():
        return False  # another host's or an unknown writer: only age can tell
    return not _process_exists(int(owner[1]))


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def fsync_file(path: Path) -> None:
    """Flush a written file's content to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish(tmp: Path, path: Path) -> None:
    """Make a complete temporary file the target: flush it, rename it over ``path``, flush the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
