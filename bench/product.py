"""One benchmark run through the product's own path: the job request is built from the method registry, the job
client makes the job folder and runs the background worker, and the scores come from the prediction files the
worker writes for the test cases (never seen by training or selection), on their own grids."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shifts import CACHE, CaseFiles, Shift

from PEFTAdaptLib.data.io import read_image
from PEFTAdaptLib.data.transforms import to_array
from PEFTAdaptLib.errors import PEFTAdaptError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec
from PEFTAdaptLib.jobs.events import read_events
from PEFTAdaptLib.methods import MethodConfig
from PEFTAdaptLib.metrics import dice, hd95

JOBS = CACHE / "jobs"
RESULT_FILE = "bench-result.json"


@dataclass
class Settings:
    steps: int
    patches_per_step: int
    patch: list[int] | None  # None: the model card's
    audit_every: int
    device: str = "cpu"

    def train(self, seed: int) -> TrainSpec:
        return TrainSpec(steps=self.steps, patch_size=self.patch, patches_per_step=self.patches_per_step,
                         audit_every=self.audit_every, seed=seed, device=self.device)


def _case(files: CaseFiles, labelled: bool = True) -> CaseSpec:
    return CaseSpec([files.image], files.label if labelled else None, files.name)


def request(shift: Shift, method: MethodConfig | None, settings: Settings, seed: int) -> JobSpec:
    """The job for one run: adapt with `method` (None: zero-shot, a predict job), predicting the test cases."""
    test = [_case(c, labelled=False) for c in shift.test]
    if method is None:
        return JobSpec(model=shift.model, task="predict", predict=test, train=TrainSpec(device=settings.device))
    labelled = method.needs_labels
    return JobSpec(model=shift.model, support=[_case(c, labelled) for c in shift.support],
                   audit=[_case(c) for c in shift.audit], predict=test, method=method, train=settings.train(seed),
                   source=[_case(c) for c in shift.extra.get("source", [])])


class PeakMemory:
    """Peak resident memory of the worker process (sampled while the run is followed)."""

    def __init__(self):
        self.peak = 0

    def sample(self, pid: int) -> None:
        import psutil

        try:
            process = psutil.Process(pid)
            self.peak = max(self.peak, sum(p.memory_info().rss for p in [process, *process.children(True)]))
        except psutil.NoSuchProcess:
            pass


def score(shift: Shift, predictions: list[Path]) -> list[dict]:
    """Per test case: Dice of every scored class, their mean, and HD95 (mm) of the union of the classes."""
    scores = []
    for case, path in zip(shift.test, predictions):
        prediction, reference = read_image(path, what="label"), read_image(case.label, what="label")  # .mgz too
        p, r = to_array(prediction, np.int64), to_array(reference, np.int64)
        per_class = {name: dice(p == value, r == value) for value, name in shift.classes.items()}
        union = np.isin(p, list(shift.classes)), np.isin(r, list(shift.classes))
        scores.append({"case": case.name, "dice": float(np.mean(list(per_class.values()))), "classes": per_class,
                       "hd95": hd95(*union, prediction.GetSpacing())})
    return scores


#: how a path inside a benchmark cache reads, in any checkout (the main tree, a worktree, a clone beside it)
_IN_CACHE = f"/{CACHE.parent.name}/{CACHE.name}/"


def portable(value):
    """`value` (a request or result, nested) with each path inside a benchmark cache written from the cache's root,
    so that a result saved by another checkout of the same cache compares equal to this checkout's request."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str) and _IN_CACHE in value:
        return "<cache>/" + value.split(_IN_CACHE, 1)[1]
    return value


def here(path: str) -> Path:
    """A path saved by any checkout of the cache, as this checkout reaches it."""
    return CACHE / path.split(_IN_CACHE, 1)[1] if _IN_CACHE in path else Path(path)


def warned(events, case: str) -> bool:
    """Whether a job's events told the user to check this volume (a `warning` that names it)."""
    return any(e["event"] == "warning" and str(e.get("message", "")).startswith(f"{case}: ") for e in events)


def with_warnings(result: dict) -> dict:
    """`result` with each test case marked `warned`: whether its job told the user to check that volume (changed
    more than the audit saw, or outside what a held-out-slab audit covers: PEFTAdaptLib/vouch.py), read from the
    job's events."""
    if "job" in result:
        events, _ = read_events(here(result["job"]))
        for case in result["cases"]:
            case["warned"] = warned(events, case["case"])
    return result


def _folder(shift: Shift, label: str, seed: int) -> Path:
    return JOBS / shift.name / f"{label.replace(' ', '_').replace('/', '_')}-seed{seed}"


def saved_result(shift: Shift, label: str, method: MethodConfig | None, settings: Settings, seed: int) -> dict | None:
    """The finished result of this very request, if one was saved."""
    path = _folder(shift, label, seed) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    try:  # read as a job file is: a request saved before a field was added compares with its default
        saved = JobSpec.from_dict(result["request"], str(path)).to_dict()
    except (KeyError, PEFTAdaptError):
        return None
    return result if portable(saved) == portable(request(shift, method, settings, seed).to_dict()) else None


def run(shift: Shift, label: str, method: MethodConfig | None, settings: Settings, seed: int,
        resume: bool = True) -> dict:
    """Run (or, with `resume`, reuse the finished result of) one method and seed on one shift."""
    folder, spec = _folder(shift, label, seed), request(shift, method, settings, seed)
    if resume and (result := saved_result(shift, label, method, settings, seed)):
        return result
    saved = folder / RESULT_FILE
    client = JobClient(folder.parent)
    memory = PeakMemory()
    start = time.monotonic()
    job = client.submit(spec, folder, overwrite=True)
    while not job.state.finished:
        job.poll()
        memory.sample(job.process.pid)
        time.sleep(0.2)
    state = job.state
    if state.outcome == "failed" and state.exit_code == 2:  # the method refused the request (e.g. over budget)
        result = {"method": label, "seed": seed, "request": spec.to_dict(), "na": state.message}
        saved.write_text(json.dumps(result, indent=1))
        return result
    if state.outcome != "finished":
        raise RuntimeError(f"{shift.name} {label} seed {seed}: {state.outcome}: {state.message} ({folder})")
    cases = score(shift, job.prediction_paths())
    finished = next(e for e in job.events if e["event"] == "finished")
    allocation = [e for e in job.events if e["event"] in ("final_selection", "allocation", "kept_allocation")]
    result = {
        "method": label, "seed": seed, "request": spec.to_dict(), "cases": cases,
        "dice": float(np.mean([c["dice"] for c in cases])), "hd95": float(np.mean([c["hd95"] for c in cases])),
        "trainable": state.trainable or 0, "total": state.total, "rank": state.rank, "rank_reason": state.rank_reason,
        "budget_reason": state.budget_reason, "best_step": finished.get("best_step", 0),
        "zero_audit": state.first_dice, "best_audit": state.best_dice, "train_seconds": finished.get("seconds", 0.0),
        "wall_seconds": time.monotonic() - start, "memory_mb": memory.peak / 2**20,
        "allocation": allocation[-1] if allocation else None, "job": str(folder),
    }
    saved.write_text(json.dumps(result, indent=1))
    return result
