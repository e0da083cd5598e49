"""One worker per job folder: an exclusive lock the OS releases when the holder dies (even by kill -9)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PEFTAdaptError

LOCK_FILE = ".lock"


class JobLocked(PEFTAdaptError):
    """Another worker holds this job folder."""


class JobLock:
    def __init__(self, job_dir: Path):
        self.path = job_dir / LOCK_FILE
        self._handle = None

    def __enter__(self) -> "JobLock":
        self._handle = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(self._handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            raise JobLocked(f"{self.path.parent}: another worker is running this job") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()  # closing releases the lock
