"""An exclusive lock on a run directory, so two runs never write into the same one.

The lock is ``fcntl.flock`` on ``RUN/.dfkd-deploy.lock``, which holds the owner's pid. The kernel
releases it when the owning process exits, however it exits (SIGKILL included), so a crashed run
never leaves a stale lock behind; the file itself stays and also marks the directory as a run
directory of ours. Under torchrun rank 0 alone takes it (see ``run.compress``).

flock locks are advisory and local to one machine's kernel: they do not protect a run directory
on a network file system against a second machine, nor against programs that do not take them.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from dfkd_deploy.core.errors import UsageError

LOCK_NAME = ".dfkd-deploy.lock"


@dataclass
class RunLock:
    path: Path
    fd: int

    def release(self) -> None:
        import fcntl

        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def acquire(run_dir: str | Path) -> RunLock:
    """Take the lock on ``run_dir`` (which must exist) or fail in one line naming the holder."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{run_dir} is in use by another dfkd-deploy run ({holder}); wait for it to end "
                             "or choose another --out") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(path, fd)
