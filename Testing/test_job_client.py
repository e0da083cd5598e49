"""The job client every front-end uses: importable without torch, one builder for job folders, an injectable
process runner, dead workers reported as interrupted, and an engine whose imports point one way."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, RunState, TrainSpec, load_job
from PEFTAdaptLib.methods import Budget, make_method

ENGINE = REPO / "PEFTAdaptLib"


def brats(case: int, name: str) -> str:
    return str(shared(f"brats/brats_2013_pat000{case}_1/{name}"))


def request(**changes) -> JobSpec:
    values = dict(model="deepbet-brain",
                  support=[CaseSpec([brats(3, "T1c_subtrMeanDivStd.nii.gz")], brats(3, "brainmask.nii.gz"))],
                  audit=[CaseSpec([brats(4, "T1c_subtrMeanDivStd.nii.gz")], brats(4, "brainmask.nii.gz"))],
                  method=make_method("lora", budget=Budget(fraction=0.02)), train=TrainSpec(steps=3))
    values.update(changes)
    return JobSpec(**values)


def test_the_job_client_imports_and_builds_jobs_without_torch(tmp_path):
    """A panel uses it before torch is installed: torch is made unimportable in a fresh interpreter."""
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError("torch is not installed")
sys.meta_path.insert(0, NoTorch())
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, RunState
from PEFTAdaptLib.methods import make_method
client = JobClient({str(tmp_path)!r})
case = CaseSpec([{brats(3, "T1c_subtrMeanDivStd.nii.gz")!r}], {brats(3, "brainmask.nii.gz")!r})
audit = CaseSpec([{brats(4, "T1c_subtrMeanDivStd.nii.gz")!r}], {brats(4, "brainmask.nii.gz")!r})
folder = client.create(JobSpec("deepbet-brain", [case], [audit], method=make_method("sea-peft")))
state = RunState()
state.update({{"event": "started", "method": "lora", "trainable": 10, "total": 1000}})
print(folder.name, state.trainable_text, [j.state for j in client.jobs()], "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "False" and "1.00 %" in result.stdout and "'created'" in result.stdout


def test_a_job_folder_holds_copies_of_its_inputs_and_only_relative_paths(tmp_path):
    folder = JobClient(tmp_path).create(request(predict=[CaseSpec([brats(5, "T1c_subtrMeanDivStd.nii.gz")])]))
    spec = load_job(folder)
    paths = [p for role in (spec.support, spec.audit, spec.predict) for c in role for p in c.images + [c.label] if p]
    assert all(not Path(p).is_absolute() and (folder / p).is_file() for p in paths)
    assert spec.predict[0].name == "brats_2013_pat0005_1_T1c_subtrMeanDivStd"  # told apart from pat3, pat4
    assert json.loads((folder / "job.json").read_text())["method"] == {
        "name": "lora", "rank": None, "budget": {"fraction": 0.02}}


def test_a_non_empty_folder_is_never_mixed_with_a_new_job(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        JobClient(tmp_path.parent).create(request(), tmp_path)
    with pytest.raises(InputError, match="not a job folder"):
        JobClient(tmp_path.parent).create(request(), tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_refused_request_leaves_no_job_behind(tmp_path):
    bad = request(audit=[CaseSpec([brats(4, "T1c_subtrMeanDivStd.nii.gz")], str(tmp_path / "missing.nii.gz"))])
    with pytest.raises(InputError, match="missing.nii.gz: label file not found"):
        JobClient(tmp_path).create(bad, tmp_path / "job")
    assert not (tmp_path / "job" / "job.json").exists() and not (tmp_path / "job" / "inputs").exists()


def test_an_audit_that_is_a_training_volume_or_a_label_that_is_its_image_is_refused(tmp_path):
    """Found by a user-level check: the training volume given again as the audit (any file name) was audited, and
    its gain reported with a confidence bound, on voxels it trained on; a label given as its own image trained."""
    shutil.copyfile(brats(3, "T1c_subtrMeanDivStd.nii.gz"), tmp_path / "copy.nii.gz")
    again = CaseSpec([str(tmp_path / "copy.nii.gz")], brats(3, "brainmask.nii.gz"))
    with pytest.raises(InputError, match="copy.nii.gz: this audit volume is the training volume .*pat0003"):
        JobClient(tmp_path).create(request(audit=[request().audit[0], again]), tmp_path / "job")
    itself = CaseSpec([brats(3, "brainmask.nii.gz")], brats(3, "brainmask.nii.gz"))
    with pytest.raises(InputError, match="brainmask.nii.gz: the label is the image file itself"):
        JobClient(tmp_path).create(request(support=[itself]), tmp_path / "job")
    assert not (tmp_path / "job").exists()
    JobClient(tmp_path).create(request(audit=[request().audit[0]] * 2), tmp_path / "job")  # one audit twice is no harm


class RecordingRunner:
    """A runner that starts nothing (the injection point Slicer uses for PythonSlicer): it records the command and
    returns a process that has already ended."""

    def __init__(self):
        self.calls = []

    def start(self, args, cwd, stdout, stderr):
        self.calls.append(list(args))

        class Ended:
            pid = -1

            def poll(self):
                return 1

            def wait(self, timeout=None):
                return 1

        return Ended()


def test_the_process_runner_is_injected_and_a_worker_that_never_reported_is_a_failure(tmp_path):
    runner = RecordingRunner()
    client = JobClient(tmp_path, runner)
    job = client.submit(request(), device="cpu")
    assert runner.calls == [[str(job.folder), "--device", "cpu"]]
    state = job.wait(timeout=10, interval=0.01)
    assert state.outcome == "failed" and "resume the job" in state.message
    job.cancel()  # an ended worker is never signalled (its PID may belong to another process by now)


class RunningRunner:
    """A worker process that is still running (it writes nothing: the test writes its events)."""

    def start(self, args, cwd, stdout, stderr):
        class Running:
            pid = -1

            def poll(self):
                return None

        return Running()


def test_a_resumed_job_is_followed_from_its_new_session_and_a_finished_one_is_not_rerun(tmp_path):
    """Found by a user-level check: a resume replayed the old log, reported the last session's `cancelled` at once
    and exited, while the new worker trained on unattended; a finished job was trained again."""
    def log(folder, *events):
        with (folder / "events.jsonl").open("a") as file:
            file.writelines(json.dumps({"time": 1.0, **e}) + "\n" for e in events)

    client = JobClient(tmp_path, RunningRunner())
    folder = client.create(request())
    log(folder, {"event": "started", "task": "adapt", "method": "lora", "steps": 30, "trainable": 5},
        {"event": "step", "step": 7, "steps": 30, "loss": 0.5}, {"event": "cancelled", "kept": "start", "exit_code": 4})
    (folder / "status.json").write_text(json.dumps({"state": "cancelled", "step": 7, "steps": 30}))
    job = client.resume(folder)
    assert job.poll() == [] and not job.state.finished and job.state.step == 7 and job.state.method == "lora"
    assert job.state.kept == ""  # what the cancelled session kept is not what this one will
    log(folder, {"event": "started", "task": "adapt", "steps": 30, "resumed_from_step": 7})
    assert [e["event"] for e in job.poll()] == ["started"] and not job.state.finished
    reopened = JobClient(tmp_path).attach(folder)  # a panel or page reopened on the resumed job
    assert reopened.poll() and not reopened.state.finished
    log(folder, {"event": "finished", "exit_code": 0})
    assert job.poll() and job.state.outcome == "finished"
    (folder / "status.json").write_text(json.dumps({"state": "finished", "step": 30, "steps": 30}))
    with pytest.raises(InputError, match="the job has finished; nothing to resume"):
        client.resume(folder)


def test_a_resumed_job_whose_log_was_emptied_starts_its_gain_from_the_checkpoints_score():
    """Found by a user-level check: with events.jsonl emptied by hand, a resumed job reported its first audit after
    the resume as the start Dice, so the gain shown was against the wrong model."""
    state = RunState()
    state.update({"event": "started", "task": "adapt", "resumed_from_step": 6, "start_dice": 0.41})
    state.update({"event": "audit", "step": 8, "dice": 0.52})
    assert (state.first_dice, state.last_dice, state.best_dice) == (0.41, 0.52, 0.52)
    fresh = RunState()  # an intact log: the step-0 audit was folded in first and stays the start
    for event in ({"event": "audit", "step": 0, "dice": 0.40}, {"event": "started", "start_dice": 0.41}):
        fresh.update(event)
    assert fresh.first_dice == 0.40


def test_a_job_whose_worker_died_is_listed_as_interrupted(tmp_path):
    client = JobClient(tmp_path)
    folder = client.create(request())
    (folder / "events.jsonl").write_text(json.dumps({"event": "started", "time": 1.0}) + "\n")
    (folder / "status.json").write_text(json.dumps({"state": "running", "step": 7, "steps": 30, "updated": 2.0}))
    [info] = client.jobs()
    assert info.state == "interrupted" and "resume" in info.message and "step 7" in info.message


def test_a_finished_job_is_listed_with_the_dice_of_the_state_it_kept_not_a_better_audit_it_did_not_keep(tmp_path):
    """Found by a user-level check: a SEA-PEFT job that kept the source (audit 0.972 → 0.9735, no reliable gain) was
    listed by `peftadapt jobs`, the Slicer panel and the browser app with 'best audit Dice 0.974'."""
    from PEFTAdaptLib.jobs.events import EventLog

    client = JobClient(tmp_path)
    folder = client.create(request())
    log = EventLog(folder, echo=False)
    for event in ({"event": "started", "steps": 4}, {"event": "audit", "step": 0, "dice": 0.9721},
                  {"event": "audit", "step": 4, "dice": 0.9735}):
        log(event)
    [info] = client.jobs()
    assert (info.dice, info.kept, info.dice_text) == (0.9735, "", "0.974 (last audit)")  # while it runs
    log({"event": "validation", "step": 4, "dice": 0.9721, "kept": "start"})
    log({"event": "finished", "best_dice": 0.9721, "best_step": 0, "kept": "start", "exit_code": 0})
    log.close()
    [info] = client.jobs()
    assert (info.dice, info.kept, info.dice_text) == (0.9721, "start", "0.972 (start kept)")
    listed = subprocess.run([sys.executable, "-m", "PEFTAdaptLib.cli", "jobs", "--work", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "audit Dice 0.972 (start kept)" in listed and "0.974" not in listed


def test_a_damaged_status_file_lists_the_job_as_invalid_and_stops_a_worker_in_one_line(tmp_path):
    """Found by a user-level check: a garbage status.json blanked the job's task, method and model in the list, and
    a status.json that is a folder crashed the worker (IsADirectoryError, traceback) instead of being refused."""
    from PEFTAdaptLib.jobs.events import EventLog

    client = JobClient(tmp_path)
    folder = client.create(request())
    (folder / "status.json").write_text("[1, 2]")
    [info] = client.jobs()
    assert (info.state, info.task, info.method, info.model) == ("invalid", "adapt", "lora", "deepbet-brain")
    (folder / "status.json").unlink()
    (folder / "status.json").mkdir()
    with pytest.raises(InputError, match="status.json: is not a file; remove it"):
        EventLog(folder, echo=False)
    [info] = client.jobs()
    assert info.state == "invalid" and "status.json: the worker's status is a folder" in info.message


def test_readapt_keeps_the_audit_cases_and_adds_the_corrected_one(tmp_path):
    client = JobClient(tmp_path)
    previous = client.create(request())
    (previous / "adapter").mkdir()
    (previous / "adapter" / "adapter.json").write_text("{}")
    (previous / "adapter" / "adapter.safetensors").write_bytes(b"")
    corrected = CaseSpec([brats(6, "T1c_subtrMeanDivStd.nii.gz")], brats(6, "brainmask.nii.gz"))
    following = client.readapt_request(previous, [corrected])
    assert following.warm_start == str(previous / "adapter") and following.support[-1] == corrected
    assert [c.images for c in following.audit] == [[str(previous / "inputs/audit0_image0.nii.gz")]]
    folder = client.create(following)
    assert load_job(folder).warm_start == "inputs/warm_start" and len(load_job(folder).support) == 2


# -- the import graph ------------------------------------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names) for every import of a file, relative imports made absolute."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_no_engine_module_imports_the_worker_and_no_private_name_crosses_a_module():
    # the front-ends: the MRML helpers, the browser app, and the command line (which starts the browser app)
    core = [p for p in ENGINE.rglob("*.py") if "mrml" not in p.parts and "web" not in p.parts and p.name != "cli.py"]
    for path in ENGINE.rglob("*.py"):
        for module, names in _imports(path):
            assert module != "PEFTAdaptLib.worker" or path.name == "worker.py", f"{path} imports the worker"
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path} imports private names {private} from {module}"
            if path in core:
                assert not module.startswith(("slicer", "qt", "PEFTAdaptLib.mrml", "PEFTAdaptLib.web")), \
                    f"{path}: the engine core never imports {module}"


def test_a_job_cancelled_while_its_worker_starts_claims_no_checkpoint_and_is_listed_cancelled(tmp_path):
    """Found by a user-level check: Cancel pressed while the worker started (a real worker, stopped before it wrote
    anything) said 'the last checkpoint was kept' with no checkpoint, and the job was listed as `created`, with no
    way to resume it."""
    from PEFTAdaptLib.jobs.runstate import CANCELLED_EARLY

    client = JobClient(tmp_path)
    job = client.submit(request())
    job.cancel()  # the worker is still importing: nothing of the job is written yet
    job.process.wait(timeout=120)
    job.poll()
    assert not (job.folder / "checkpoint").exists() and not (job.folder / "events.jsonl").exists()
    assert job.state.outcome == "cancelled" and job.state.describe() == CANCELLED_EARLY.capitalize()
    reopened = client.attach(job.folder)  # Open in a panel: the cancel request tells what happened
    reopened.poll()
    assert reopened.state.describe() == CANCELLED_EARLY.capitalize()
    [info] = client.jobs()  # as `peftadapt jobs` lists it: cancelled, and a resume starts it from the beginning
    assert (info.state, info.message, info.resumable) == ("cancelled", CANCELLED_EARLY, True)

    kept = RunState()  # a checkpoint written: then it was kept
    for event in ({"event": "started", "steps": 9}, {"event": "checkpoint", "step": 2, "path": "checkpoint"},
                  {"event": "cancelled", "reason": "stopped by the user"}):
        kept.update(event)
    assert kept.describe().startswith("Cancelled — the last checkpoint was kept")


def test_job_folders_that_are_links_are_listed_invalid_without_reading_through_them(tmp_path):
    """Found by a user-level check: `jobs/job-link-out → a job elsewhere` was listed with what it held, and opened."""
    client = JobClient(tmp_path / "work")
    inside = client.create(request())
    outside = JobClient(tmp_path / "elsewhere").create(request())
    os.symlink(outside, client.work_dir / "job-link-out")
    os.symlink(inside.name, client.work_dir / "job-link-in")
    listed = {info.folder.name: info for info in client.jobs()}
    assert listed[inside.name].state == "created" and listed[inside.name].model == "deepbet-brain"
    for name in ("job-link-out", "job-link-in"):
        info = listed[name]
        assert (info.state, info.model, info.resumable) == ("invalid", "", False)
        assert "is a symbolic link" in info.message and "\n" not in info.message
        with pytest.raises(InputError, match="is a symbolic link"):
            client.resume(client.work_dir / name)
    assert not (outside / "worker.log").exists() and not (inside / "worker.log").exists()  # no worker started
