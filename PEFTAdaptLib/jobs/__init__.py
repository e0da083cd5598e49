"""The job client (no torch): job folders made from requests, workers launched and followed, runs as state.

A job folder holds `job.json` (the request, inputs copied into `inputs/`), `events.jsonl` and `status.json` (what
the worker reports), `checkpoint/`, `adapter/` and `predictions/` (what it writes). docs/worker.md has the protocol.
"""
from .client import ADAPTER_DIR, CANCEL_FILE, RESUMABLE, Job, JobClient, JobInfo, job_info
from .create import create_job
from .events import read_events
from .runner import ProcessRunner, SubprocessRunner
from .runstate import RunState
from .spec import SCHEMA_VERSION, CaseSpec, JobSpec, TrainSpec, load_job

__all__ = [
    "ADAPTER_DIR", "CANCEL_FILE", "RESUMABLE", "SCHEMA_VERSION", "CaseSpec", "Job", "JobClient", "JobInfo",
    "JobSpec", "ProcessRunner", "RunState", "SubprocessRunner", "TrainSpec", "create_job", "job_info", "load_job",
    "read_events",
]
