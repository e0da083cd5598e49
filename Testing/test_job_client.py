"""The job client every front-end uses: importable without torch, one builder for job folders, an injectable
process runner, dead workers reported as interrupted, and an engine whose imports point one way."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec, load_job
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
folder = client.create(JobSpec("deepbet-brain", [case], [case], method=make_method("sea-peft")))
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
    assert spec.predict[0].name == "T1c_subtrMeanDivStd"
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


def test_a_job_whose_worker_died_is_listed_as_interrupted(tmp_path):
    client = JobClient(tmp_path)
    folder = client.create(request())
    (folder / "events.jsonl").write_text(json.dumps({"event": "started", "time": 1.0}) + "\n")
    (folder / "status.json").write_text(json.dumps({"state": "running", "step": 7, "steps": 30, "updated": 2.0}))
    [info] = client.jobs()
    assert info.state == "interrupted" and "resume" in info.message and "step 7" in info.message


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
