"""`events.jsonl` (one JSON object per line, flushed as written, echoed on stdout) and `status.json` (the latest
state, replaced atomically) — what the GUI tails."""
from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from ..errors import InputError
from .files import open_job_file, write_file

EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """The worker's side. `status.json` names the worker's PID and host, so that a front-end can say which process
    runs (or ran) the job; whether it still runs is told by the job lock (`lock.is_running`)."""

    def __init__(self, job_dir: Path, echo: bool = True):
        self.job_dir = job_dir
        self.echo = echo
        self.status: dict = {"state": "starting", "pid": os.getpid(), "host": socket.gethostname()}
        if (job_dir / STATUS_FILE).exists() and not (job_dir / STATUS_FILE).is_file():  # it could not be replaced
            raise InputError(f"{job_dir / STATUS_FILE}: is not a file; remove it, then start or resume the job")
        self._file = open_job_file(job_dir / EVENTS_FILE, "a")
        if self._file.tell():  # a line cut short by a kill mid-write: the next event starts a line of its own
            with open(job_dir / EVENTS_FILE, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    self._file.write("\n")

    def __call__(self, event: dict) -> None:
        event = _clean({"time": round(time.time(), 3), **event})
        line = json.dumps(event)
        self._file.write(line + "\n")
        self._file.flush()
        if self.echo:
            print(line, flush=True)
        self._update_status(event)

    def _update_status(self, event: dict) -> None:
        kind = event["event"]
        status = self.status
        if kind in ("started", "finished", "failed", "cancelled"):
            status["state"] = kind if kind != "started" else "running"
        for key in ("step", "steps", "loss", "eta_s", "message", "reason", "exit_code"):
            if key in event:
                status[key] = event[key]
        if kind in ("audit", "validation") and "dice" in event:
            status["last_dice"] = event["dice"]
        if kind in ("finished", "cancelled") and "best_dice" in event:  # the adapter's state, not the best audit seen
            status["kept_dice"], status["kept"] = event["best_dice"], event.get("kept", "")
        if "agreement" in event:  # label-free: ESH/decoder agreement in place of a Dice audit
            status["last_agreement"] = event["agreement"]
            status["best_agreement"] = max(event["agreement"], status.get("best_agreement", -1.0))
        if kind == "checkpoint":
            status["checkpoint"] = event["path"]
        status["updated"] = event["time"]
        write_file(self.job_dir / STATUS_FILE, json.dumps(status, indent=1))

    def close(self) -> None:
        self._file.close()


def read_events(job_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete event lines after byte `offset`, and the new offset (a partly written last line waits)."""
    path = Path(job_dir) / EVENTS_FILE
    if not path.exists():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].decode("utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # not written by a worker (a damaged or edited log): skipped, not a crash
            continue
    return [e for e in events if isinstance(e, dict) and "event" in e], offset + end
