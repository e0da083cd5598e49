"""Starting and stopping the worker process. A front-end may pass its own runner (Slicer passes PythonSlicer; a test
may pass one that runs nothing); the default starts `python -m PEFTAdaptLib.worker` as a child process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .files import open_job_file

WORKER_MODULE = "PEFTAdaptLib.worker"
#: what stops a run with a checkpoint, as a cancel does: a closed terminal (SIGHUP) too, where there is one
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Process(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class ProcessRunner(Protocol):
    def start(self, args: Sequence[str], cwd: Path, stdout: Path, stderr: Path) -> Process: ...


class SubprocessRunner:
    """`python -m PEFTAdaptLib.worker ARGS` with output to files; `python_path` entries go first on PYTHONPATH (the
    folder holding PEFTAdaptLib when it is not installed, as in Slicer), `environment` is added to the child's.
    `own_session`: the worker leaves the caller's process group, so a Ctrl-C or a closed terminal stops the caller but
    not the job (the browser server, which finds the job again when restarted); the command line keeps Ctrl-C =
    cancel."""

    def __init__(self, python: str | None = None, python_path: Sequence[str] = (), environment: dict | None = None,
                 own_session: bool = False):
        self.python = python or sys.executable
        self.python_path = [str(p) for p in python_path]
        self.environment = dict(environment or {})
        self.own_session = own_session

    def start(self, args: Sequence[str], cwd: Path, stdout: Path, stderr: Path) -> Process:
        env = {**os.environ, **self.environment}
        if self.python_path:
            env["PYTHONPATH"] = os.pathsep.join([*self.python_path, *filter(None, [env.get("PYTHONPATH")])])
        options = {}
        if sys.platform == "win32":  # no console window for the worker (closing it would kill the worker)
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = subprocess.SW_HIDE
            group = subprocess.CREATE_NEW_PROCESS_GROUP if self.own_session else 0
            options = {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW | group}
        elif self.own_session:
            options = {"start_new_session": True}
        with open_job_file(stdout, "ab") as out, open_job_file(stderr, "ab") as err:
            return subprocess.Popen([self.python, "-m", WORKER_MODULE, *args], cwd=str(cwd), stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, **options)


def stop_process_tree(pid: int, graceful: bool = True) -> None:
    """Stop a worker and everything it started (a launcher such as PythonSlicer runs the interpreter as its child).
    Graceful: SIGTERM, which the worker turns into a checkpoint and a `cancelled` event."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.terminate() if graceful else process.kill()
        except psutil.NoSuchProcess:
            pass
