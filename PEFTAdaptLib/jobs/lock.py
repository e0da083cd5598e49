"""One worker per job folder: an exclusive lock the OS releases when the holder dies (even by kill -9).

The lock is also how a front-end tells a running job from one whose worker died: a job that says "running" but
whose lock can be taken is interrupted."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PEFTAdaptError
from .files import NOFOLLOW, open_job_file

LOCK_FILE = ".lock"


class JobLocked(PEFTAdaptError):
    """Another worker holds this job folder."""


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class JobLock:
    """Held by the worker while it runs a job and by the builder while it writes one; the lock file holds the
    holder's PID."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / LOCK_FILE
        self._handle = None

    def __enter__(self) -> "JobLock":
        self._handle = open_job_file(self.path, "r+")  # a planted link is refused, not truncated
        if not _try_lock(self._handle):
            self._handle.close()
            raise JobLocked(f"{self.path.parent}: another worker is running this job (or a job is being written "
                            "into this folder)")
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()  # closing releases the lock


def is_running(job_dir: Path) -> bool:
    """True while a worker holds the job folder's lock."""
    path = Path(job_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | NOFOLLOW)
    except OSError:  # no lock file (never started), or a link: no worker of ours holds it
        return False
    with os.fdopen(fd, "r+") as handle:
        return not _try_lock(handle)  # closing releases a lock taken here
