"""`events.jsonl` (one JSON object per line, flushed as written, echoed on stdout) and `status.json` (the latest
state, replaced atomically) — what the GUI tails."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

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
    def __init__(self, job_dir: Path, echo: bool = True):
        self.job_dir = job_dir
        self.echo = echo
        self.status: dict = {"state": "starting"}
        self._file = open(job_dir / EVENTS_FILE, "a", encoding="utf-8")

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
            status["best_dice"] = max(event["dice"], status.get("best_dice", -1.0))
        if "agreement" in event:  # label-free: ESH/decoder agreement in place of a Dice audit
            status["last_agreement"] = event["agreement"]
            status["best_agreement"] = max(event["agreement"], status.get("best_agreement", -1.0))
        if kind == "checkpoint":
            status["checkpoint"] = event["path"]
        status["updated"] = event["time"]
        tmp = self.job_dir / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, self.job_dir / STATUS_FILE)

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
    events = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
    return events, offset + end
