"""The job client: make, launch, follow, cancel, resume, re-adapt and list jobs — the one path every front-end
(CLI, Slicer panel, browser app, benchmarks) takes to the worker. Imports no torch: a panel can use it before
torch is installed."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError
from ..jsonfile import read_json
from .create import ADAPTER_DIR, create_job
from .events import EVENTS_FILE, STATUS_FILE, read_events
from .files import check_writable, open_job_file, refuse_linked_folder, refuse_links
from .lock import is_running
from .runner import Process, ProcessRunner, SubprocessRunner, stop_process_tree
from .runstate import CANCELLED_EARLY, RunState
from .spec import JOB_FILE, CaseSpec, JobSpec, load_job, resolve_input

CANCEL_FILE = "cancel"
STDOUT_LOG, STDERR_LOG = "worker.log", "worker.err.log"
#: worker exit codes (PEFTAdaptLib.worker)
EXIT_FINISHED, EXIT_INVALID, EXIT_FAILED, EXIT_CANCELLED, EXIT_LOCKED = 0, 2, 3, 4, 5
#: the listed states (`JobInfo.state`) a job can be resumed from: its last checkpoint is kept in each (but a job
#: the worker refused as invalid input fails again: `JobInfo.resumable`)
RESUMABLE = ("interrupted", "cancelled", "failed")


class Job:
    """One job folder and, when this client launched it, its worker process. `poll()` folds new events into
    `state`; a worker that died without a final event is reported as such."""

    def __init__(self, folder: Path, process: Process | None = None):
        self.folder = Path(folder)
        self.process = process
        self.state = RunState()
        self.events: list[dict] = []
        self._offset = 0
        self._cancel_requested = False

    @property
    def spec(self) -> JobSpec:
        return load_job(self.folder)

    @property
    def adapter_folder(self) -> Path:
        return self.folder / ADAPTER_DIR

    def prediction_paths(self) -> list[Path]:
        return [self.folder / path for path in self.state.predictions]

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return is_running(self.folder)

    def poll(self) -> list[dict]:
        """The events written since the last poll (also folded into `state`)."""
        if self.process is not None and self.process.poll() == EXIT_LOCKED:  # the events there are another run's
            self.state.fail(f"{self.folder}: another worker is running this job, or a job was being written into "
                            "the folder when this one started")
            return []
        new, self._offset = read_events(self.folder, self._offset)
        if not self.state.finished and not new and not self.alive():
            new, self._offset = read_events(self.folder, self._offset)  # written just before the worker ended
            self._fold(new)
            if not self.state.finished:
                if self._cancel_requested or (self.folder / CANCEL_FILE).exists():  # also one sent by another client
                    self.state.update({"event": "cancelled", "reason": "stopped by the user"})
                else:
                    self.state.fail(self._last_error() or "the worker stopped without finishing; "
                                    "resume the job to continue from its last checkpoint")
            return new
        self._fold(new)
        return new

    def fold_history(self) -> None:
        """The events of the job's earlier sessions, folded in without their outcome (the job is about to resume)."""
        history, self._offset = read_events(self.folder, self._offset)
        self._fold(history)
        self.state.reopen()

    def _fold(self, events: list[dict]) -> None:
        for event in events:
            self.state.update(event)
        self.events.extend(events)

    def cancel(self) -> None:
        """Ask the worker to stop: it writes a checkpoint and a `cancelled` event, then exits."""
        self._cancel_requested = True
        if self.state.finished or not self.alive():
            return  # a reaped worker's PID may belong to another process now: never signal it
        open_job_file(self.folder / CANCEL_FILE, "a").close()
        if self.process is not None:
            stop_process_tree(self.process.pid, graceful=True)

    def wait(self, timeout: float | None = None, interval: float = 0.5,
             on_events: Callable[[list[dict]], None] | None = None) -> RunState:
        """Poll until the job ends (or `timeout` seconds pass: then cancel it and wait for the cancel)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            new = self.poll()
            if on_events is not None and new:
                on_events(new)
            if self.state.finished:
                return self.state
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = time.monotonic() + 120
            time.sleep(interval)

    def _last_error(self) -> str:
        path = self.folder / STDERR_LOG
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
        return lines[-1] if lines else ""


@dataclass
class JobInfo:
    """A past or running job, as `JobClient.jobs()` lists it."""

    folder: Path
    task: str
    model: str
    method: str
    state: str  # starting, running, finished, failed, cancelled, interrupted, invalid
    step: int
    steps: int
    dice: float | None  # the audit Dice of the state its adapter holds once it ended; of the last audit while it runs
    message: str
    updated: float
    exit_code: int | None = None  # the worker's, once it ended
    kept: str = ""  # once it ended: "adapted", or "start" (no state passed the selection rule)

    @property
    def dice_text(self) -> str:
        """The Dice a jobs list shows, saying whose: never a best audit the selection rule did not keep."""
        if self.dice is None:
            return ""
        if self.kept:
            return f"{self.dice:.3f} ({'adapted' if self.kept == 'adapted' else 'start kept'})"
        # one that ended with no kept Dice on record (label-free; a job of an earlier version): its last Dice as such
        return f"{self.dice:.3f}" + ("" if self.state in ("finished", "cancelled") else " (last audit)")

    @property
    def resumable(self) -> bool:
        """A resume restarts the same inputs and settings: a job the worker refused as invalid would fail again."""
        return self.state in RESUMABLE and self.exit_code != EXIT_INVALID


class JobClient:
    """Jobs in a work folder, launched with `runner` (default: a child Python running the worker)."""

    def __init__(self, work_dir: str | Path, runner: ProcessRunner | None = None):
        self.work_dir = Path(work_dir).expanduser().absolute()
        self.runner = runner or SubprocessRunner()

    def new_folder(self, prefix: str = "job") -> Path:
        """A fresh, empty job folder under the work folder (never one that exists)."""
        check_writable(self.work_dir, "the work folder")
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.work_dir}: cannot create the work folder ({exc.strerror})") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for index in range(1000):
            folder = self.work_dir / f"{prefix}-{stamp}-{index:03d}"
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder
        raise InputError(f"{self.work_dir}: cannot create a new job folder")

    def create(self, request: JobSpec, folder: str | Path | None = None, overwrite: bool = False) -> Path:
        return create_job(folder if folder is not None else self.new_folder(request.task), request, overwrite)

    def launch(self, folder: str | Path, resume: bool = False, device: str | None = None) -> Job:
        folder = Path(folder).absolute()
        refuse_linked_folder(folder)
        if not (folder / JOB_FILE).is_file():
            raise InputError(f"{folder}: not a job folder (no {JOB_FILE})")
        if is_running(folder):
            raise InputError(f"{folder}: a worker is already running this job")
        refuse_links(folder)
        args = [str(folder)] + (["--resume"] if resume else []) + (["--device", device] if device else [])
        job = Job(folder)
        if resume:  # read before the worker starts: what follows is this session's
            job.fold_history()
        job.process = self.runner.start(args, folder, folder / STDOUT_LOG, folder / STDERR_LOG)
        return job

    def submit(self, request: JobSpec, folder: str | Path | None = None, overwrite: bool = False,
               device: str | None = None) -> Job:
        """Make the job folder and start its worker."""
        return self.launch(self.create(request, folder, overwrite), device=device)

    def resume(self, folder: str | Path, device: str | None = None) -> Job:
        """Continue an interrupted or cancelled job from its last checkpoint; a finished one has nothing left."""
        folder = Path(folder).absolute()
        info = job_info(folder) if (folder / JOB_FILE).is_file() else None
        if info is not None and info.state == "finished":
            raise InputError(f"{folder}: the job has finished; nothing to resume (its results are in the folder)")
        if info is not None and info.exit_code == EXIT_INVALID:
            raise InputError(f"{folder}: the worker refused the job ({info.message}); a resume keeps its inputs and "
                             "settings, so start a new job instead")
        return self.launch(folder, resume=True, device=device)

    def attach(self, folder: str | Path) -> Job:
        """Follow a job this client did not launch (a refreshed browser tab, a panel reopened)."""
        return Job(Path(folder).absolute())

    def readapt_request(self, previous: str | Path, corrected: Sequence[CaseSpec], **changes) -> JobSpec:
        """The next round after `previous`: warm start from its adapter, its support plus the corrected cases, the
        same audit cases (so the Dice curves of the rounds compare), the same method and settings unless changed."""
        previous = Path(previous).absolute()
        spec = load_job(previous)
        if not (previous / ADAPTER_DIR / "adapter.json").is_file():
            raise InputError(f"{previous}: has no adapter to continue from (did the job finish?)")
        found = lambda path: str(resolve_input(previous, path)) if path else None  # noqa: E731
        absolute = lambda cases: [replace(c, images=[found(p) for p in c.images], label=found(c.label),  # noqa: E731
                                          annotated=found(c.annotated)) for c in cases]
        return replace(replace(spec, support=absolute(spec.support) + list(corrected), audit=absolute(spec.audit),
                               source=absolute(spec.source), predict=absolute(spec.predict),
                               warm_start=str(previous / ADAPTER_DIR)), **changes)

    def readapt(self, previous: str | Path, corrected: Sequence[CaseSpec], folder: str | Path | None = None,
                **changes) -> Job:
        return self.submit(self.readapt_request(previous, corrected, **changes), folder)

    def jobs(self) -> list[JobInfo]:
        """Every job folder in the work folder, newest first; a job whose worker died says `interrupted`."""
        found = []
        for folder in sorted(self.work_dir.glob("*/" + JOB_FILE)):
            found.append(job_info(folder.parent))
        return sorted(found, key=lambda info: info.updated, reverse=True)


def job_info(folder: Path) -> JobInfo:
    """A job as listed. A job that says it runs is `interrupted` when its lock is free (the worker died, even by
    kill -9), unless it runs on another computer, where this one cannot tell. A folder that is or holds a link is
    `invalid` and nothing is read through the link (it may lead outside the work folder)."""
    task = model = method = ""
    try:
        refuse_linked_folder(folder)
        refuse_links(folder)
    except InputError as exc:
        return JobInfo(folder, task, model, method, "invalid", 0, 0, None, str(exc), folder.lstat().st_mtime)
    try:
        spec = load_job(folder)
        task, model, method = spec.task, spec.model, spec.method.name if spec.method else ""
        status = _read_status(folder)
    except InputError as exc:  # what the job is stays listed when only its status is damaged
        return JobInfo(folder, task, model, method, "invalid", 0, 0, None, str(exc), folder.stat().st_mtime)
    state = status.get("state", "created" if not (folder / EVENTS_FILE).exists() else "starting")
    message = status.get("message", "")
    if state == "created" and (folder / CANCEL_FILE).exists() and not is_running(folder):  # cancelled while starting
        state, message = "cancelled", CANCELLED_EARLY
    worker = f"the worker (PID {status.get('pid', '?')} on {status.get('host', '?')})"
    if state in ("starting", "running"):
        if status.get("host", socket.gethostname()) != socket.gethostname():
            message = f"{worker} runs on another computer; this one cannot tell whether it still runs"
        elif not is_running(folder):
            state = "interrupted"
            message = (f"{worker} stopped at step {status.get('step', 0)} without finishing; resume with "
                       f"`peftadapt adapt --resume --output {folder}`")
    return JobInfo(folder, task, model, method, state, int(status.get("step", 0)), int(status.get("steps", 0)),
                   status.get("kept_dice", status.get("last_dice")), message,
                   status.get("updated", folder.stat().st_mtime), status.get("exit_code"), status.get("kept", ""))


def _read_status(folder: Path) -> dict:
    path = folder / STATUS_FILE
    return read_json(path, "the worker's status") if path.exists() else {}
