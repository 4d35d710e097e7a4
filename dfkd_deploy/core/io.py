"""Crash-safe file writing: every artifact lands through a temporary file and an atomic rename,
so a run killed at any moment leaves either the old or the new version, never half a file.

A write that fails because the disk is full or the directory is not writable raises
:class:`OutputError` (a :class:`~dfkd_deploy.core.errors.DfkdError`: one line, exit 2) naming the file;
the temporary file is removed and the previous version of the file stays as it was.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dfkd_deploy.core.errors import DfkdError

_UMASK = os.umask(0)
os.umask(_UMASK)

# Failures that mean "this output location cannot take the file", as opposed to a bug.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied (not writable)",
            errno.EPERM: "operation not permitted (not writable)", errno.EFBIG: "file too large"}


class OutputError(DfkdError):
    """An output file could not be written (disk full, read-only or not writable location)."""


def os_error_reason(exc: OSError) -> str:
    """The reason of a failed write in words, e.g. ``no space left on the device``."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc)


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """One line for a failed write: the file and the reason."""
    where = path or exc.filename
    return f"cannot write {where}: {os_error_reason(exc)}" if where else f"cannot write: {os_error_reason(exc)}"


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named like the temporary files :func:`atomic_path` writes through
    (``.NAME.*.tmp``): what a process killed in the middle of a write leaves behind."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def _make_temp(path: Path) -> Path:
    """An empty temporary file beside ``path`` with the usual permissions (a seam for tests)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; artifacts get the usual permissions
    return Path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    An OSError of the "cannot write here" kinds (:data:`OUTPUT_ERRNOS`) raised while the caller
    writes the temporary file, or while it is flushed and renamed, becomes :class:`OutputError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _make_temp(path)
    except OSError as exc:
        if exc.errno in OUTPUT_ERRNOS:
            raise OutputError(describe_os_error(exc, path)) from None
        raise
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in OUTPUT_ERRNOS:
            raise OutputError(describe_os_error(exc, path)) from None
        raise
    finally:
        try:
            if tmp_path.exists() or tmp_path.is_symlink():
                tmp_path.unlink()
        except OSError:
            pass   # leftovers are named .NAME.*.tmp: readers ignore them


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


class _WriteRecorder:
    """A file object for ``torch.save`` that keeps the OSError of a failed write: torch turns it
    into a RuntimeError without errno, which would hide a full disk."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = exc
            raise


def save_torch(path: str | Path, obj: Any) -> Path:
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            rec = _WriteRecorder(fh)
            try:
                torch.save(obj, rec)
                rec.flush()
            except RuntimeError:
                if rec.error is not None:
                    raise rec.error from None
                raise
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
