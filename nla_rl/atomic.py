"""Atomic file writes: readers see the old file or the new one, never half of one.

Files go through :func:`atomic_path`: the content is written to a temp file beside the target
(same file system, so the rename is atomic), which replaces the target only when writing
succeeded and is deleted otherwise. Model directories go through :func:`atomic_dir` the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nla_rl.errors import NLAError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` (same suffix, so suffix-sensitive writers behave); it is
    renamed onto ``path`` when the block ends without error and removed in every case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden path beside directory ``path`` (not created: write the directory there). When the
    block succeeds it replaces ``path`` (a previous ``path`` is moved aside, and put back if the
    swap fails); whatever the block left there is deleted in every other case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        if not dst.is_dir():
            raise NLAError(f"{dst}: exists and is not a directory; refusing to replace it")
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept, a final newline) to ``path`` atomically,
    creating its parent directories: the one JSON writer of the project."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False,
                                                 sort_keys=sort_keys) + "\n")


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is (or can be created as) a directory this process may write in: one clear
    error, before any work, for a path that is a file or lies in a read-only directory. Nothing
    is created here."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise NLAError(f"{what} {str(path)!r} {where}; give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NLAError(f"{what} {str(path)!r}: {existing} is not writable; choose a writable "
                       f"location or fix its permissions")
    return path
