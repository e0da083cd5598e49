"""The job protocol: a job folder (job.json in, events/status/checkpoints/predictions out) run by the worker."""
from .spec import SCHEMA_VERSION, CaseSpec, JobSpec, MethodSpec, TrainSpec, load_job, write_job

__all__ = ["SCHEMA_VERSION", "CaseSpec", "JobSpec", "MethodSpec", "TrainSpec", "load_job", "write_job"]
