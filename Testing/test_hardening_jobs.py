"""Job folders under hostile or careless use (issue 17, points 3, 6, 7, 8, 10, 11): links planted in a job folder
never lead a write outside it, a running job is never overwritten, a resume continues only its own job, a dead
worker is reported as interrupted and resumes with the command it prints, a diverging run stops keeping its last
finite checkpoint, an empty prediction earns no audit Dice, and bad numbers or output paths end in one line before
any work. Real worker processes, the real default model and real BraTS / MeshNet files throughout."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import PEFTAdaptLib.jobs.create as builder
from conftest import shared
from PEFTAdaptLib import cli
from PEFTAdaptLib.adapters import LoRAConfig, add_units, iter_units, load_adapters, save_adapters, unit_class_for
from PEFTAdaptLib.adapters.base import base_layer_names
from PEFTAdaptLib.data.formats import distinct_names
from PEFTAdaptLib.errors import InputError, ModelError
from PEFTAdaptLib.jobs import Job, JobClient, JobSpec, SubprocessRunner, create_job, load_job
from PEFTAdaptLib.jobs.events import EventLog
from PEFTAdaptLib.jobs.lock import JobLock, is_running
from PEFTAdaptLib.methods import Plan, method_class, register_method
from PEFTAdaptLib.training import SupervisedObjective, audit_dice
from PEFTAdaptLib.worker import EXIT_CANCELLED, EXIT_FAILED, EXIT_FINISHED, EXIT_INVALID, EXIT_LOCKED, run_job
from test_cli import PEFTADAPT, assert_one_line_error
from test_worker import adapter_tensors, brats, case, events, spec, wait_for

IMAGE, MASK = brats(3, "T1c_subtrMeanDivStd.nii.gz"), brats(3, "brainmask.nii.gz")
AUDIT_IMAGE, AUDIT_MASK = brats(4, "T1c_subtrMeanDivStd.nii.gz"), brats(4, "brainmask.nii.gz")
VICTIM_TEXT = "the user's own file, outside every job folder\n"


def peftadapt(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([str(PEFTADAPT), *args], capture_output=True, text=True, timeout=900, **options)


def adapt_args(output: Path, *extra: str) -> list[str]:
    return ["adapt", "--method", "lora", "--rank", "2", "--train", IMAGE, MASK, "--audit", AUDIT_IMAGE, AUDIT_MASK,
            "--steps", "2", "--patch-size", "64", "--patches-per-step", "1", "--device", "cpu", "--output",
            str(output), *extra]


def in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`peftadapt ARGV` in this process (argparse errors included); returns the code and the stderr lines."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- 3: links planted in a job folder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A job folder as the builder makes it (copied for each test: the builder reads the inputs once)."""
    return create_job(tmp_path_factory.mktemp("template") / "job", spec(steps=2))


@pytest.fixture
def victims(tmp_path) -> tuple[Path, Path]:
    """A file and a folder of the user's, outside the job folder, that a planted link points to."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "file.txt").write_text(VICTIM_TEXT)
    (outside / "folder" / "kept.txt").write_text(VICTIM_TEXT)
    return outside / "file.txt", outside / "folder"


def plant(job: Path, name: str, victims: tuple[Path, Path]) -> Path:
    """A link named `name` in `job` to the victim file, or to the victim folder for the folders the worker writes."""
    link = job / name
    link.parent.mkdir(exist_ok=True)
    if link.is_dir():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    folders = ("checkpoint", ".checkpoint.writing", ".checkpoint.previous", "adapter", ".adapter.writing",
               ".adapter.previous", "predictions", "inputs")
    link.symlink_to(victims[1] if name in folders else victims[0])
    return link


def assert_untouched(victims: tuple[Path, Path]) -> None:
    assert victims[0].read_text() == VICTIM_TEXT
    assert sorted(p.name for p in victims[1].iterdir()) == ["kept.txt"]
    assert (victims[1] / "kept.txt").read_text() == VICTIM_TEXT


WORKER_FILES = [".lock", "events.jsonl", "status.json", "status.json.tmp", "traceback.txt", "traceback.txt.tmp",
                "cancel", "checkpoint", ".checkpoint.writing", ".checkpoint.previous", "adapter", ".adapter.writing",
                ".adapter.previous", "predictions", "predictions/T1c_subtrMeanDivStd_seg.nii.gz", "inputs",
                "worker.log", "worker.err.log", "job.json.tmp", "cli-traceback.txt"]


@pytest.mark.parametrize("name", WORKER_FILES)
def test_a_worker_refuses_a_job_folder_holding_a_link_and_writes_nothing_through_it(tmp_path, template, victims,
                                                                                   name, capsys):
    job = tmp_path / "job"
    shutil.copytree(template, job)
    plant(job, name, victims)
    assert run_job(job, echo=False) == EXIT_INVALID
    error = capsys.readouterr().err
    assert f"{name}: is a symbolic link" in error, error
    assert_untouched(victims)
    assert (job / name).is_symlink()


def test_the_job_client_refuses_to_launch_into_a_folder_holding_a_link(tmp_path, template, victims):
    job = tmp_path / "job"
    shutil.copytree(template, job)
    plant(job, "worker.log", victims)  # the client itself appends the worker's output there
    with pytest.raises(InputError, match="worker.log: is a symbolic link"):
        JobClient(tmp_path).resume(job)
    assert_untouched(victims)


def test_overwriting_a_job_folder_removes_its_links_without_following_them(tmp_path, template, victims):
    job = tmp_path / "job"
    shutil.copytree(template, job)
    plant(job, "inputs", victims)
    plant(job, "job.json.tmp", victims)
    create_job(job, spec(steps=3), overwrite=True)
    assert_untouched(victims)
    assert not (job / "inputs").is_symlink() and load_job(job).train.steps == 3


def test_a_job_folder_that_is_a_link_is_refused_and_what_it_points_to_is_untouched(tmp_path, template, capsys):
    """Followed, the link would have `--overwrite` empty the folder it points to and a resume write there; a dangling
    one said "File exists". A link among the job folder's parents (/tmp on macOS) stays allowed."""
    real = tmp_path / "real"
    shutil.copytree(template, real)
    (real / "notes.txt").write_text(VICTIM_TEXT)
    before = digest(real)
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(real, target_is_directory=True)
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    for folder in (link, dangling):
        refusal = f"{folder}: is a symbolic link (to {os.readlink(folder)}); give the real folder path"
        for argv in (adapt_args(folder, "--overwrite"), ["adapt", "--resume", "--output", str(folder)]):
            assert in_process(argv, capsys) == (2, [f"peftadapt: error: {refusal}"])
        assert run_job(folder, echo=False) == EXIT_INVALID
        assert capsys.readouterr().err.strip() == f"peftadapt worker: {refusal}"
    assert digest(real) == before and not (tmp_path / "nowhere").exists()

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "parent").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    create_job(tmp_path / "parent" / "job", spec(steps=2))
    assert load_job(tmp_path / "elsewhere" / "job").train.steps == 2


def _events(job: Path):
    EventLog(job, echo=False)({"event": "started"})


def _lock(job: Path):
    JobLock(job).__enter__()


def _cancel(job: Path):
    from PEFTAdaptLib.jobs.files import open_job_file

    open_job_file(job / "cancel", "a")


def _status(job: Path):
    from PEFTAdaptLib.jobs.files import write_file

    write_file(job / "status.json", "{}")
    assert not (job / "status.json").is_symlink()


def _checkpoint(job: Path):
    from PEFTAdaptLib.jobs.files import replace_folder

    replace_folder(job, "checkpoint", lambda folder: (folder / "adapter.json").write_text("{}"))
    assert (job / "checkpoint" / "adapter.json").is_file() and not (job / "checkpoint").is_symlink()


def _worker_log(job: Path):
    runner = SubprocessRunner(python=shutil.which("echo"))  # a "worker" that prints its arguments to worker.log
    runner.start([], job, job / "worker.log", job / "worker.err.log").wait(timeout=60)


@pytest.mark.parametrize("name, write", [
    ("events.jsonl", _events), (".lock", _lock), ("cancel", _cancel), ("status.json.tmp", _status),
    ("status.json", _status), (".checkpoint.writing", _checkpoint), (".checkpoint.previous", _checkpoint),
    ("checkpoint", _checkpoint), ("worker.log", _worker_log),
])
def test_each_job_file_writer_refuses_or_replaces_a_link_planted_after_the_start(tmp_path, victims, name, write):
    """Defence in depth: a link planted while a job runs (after the folder was checked) is not followed either."""
    job = tmp_path / "job"
    job.mkdir()
    plant(job, name, victims)
    try:
        write(job)
    except InputError as exc:
        assert f"{name}: is a symbolic link" in str(exc)
    assert_untouched(victims)


def test_a_planted_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "events.jsonl")
    with pytest.raises(InputError, match="not a regular file"):
        EventLog(tmp_path)


def test_a_hard_link_to_a_users_file_is_not_written_through(tmp_path, victims):
    job = tmp_path / "job"
    job.mkdir()
    os.link(victims[0], job / "events.jsonl")
    os.link(victims[0], job / ".lock")
    with pytest.raises(InputError, match="hard link"):
        EventLog(job)
    with pytest.raises(InputError, match="hard link"):
        JobLock(job).__enter__()
    assert_untouched(victims)


# -- 6: numbers, divergence, the audit ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, fragment", [
    (["--lr", "nan"], "train.lr: nan"), (["--lr", "inf"], "train.lr: inf"), (["--lr", "0"], "train.lr: 0.0"),
    (["--lr", "5"], "train.lr: 5.0"), (["--steps", "0"], "train.steps: 0"), (["--audit-every", "0"],
    "train.audit_every: 0"), (["--checkpoint-every", "-1"], "train.checkpoint_every: -1"),
    (["--patches-per-step", "0"], "train.patches_per_step: 0"), (["--seed", "-1"], "train.seed: -1"),
    (["--patch-size", "4"], "train.patch_size: 4"), (["--patch-size", "32"], "multiples of 32 and at least 64"),
    (["--patch-size", "80"], "multiples of 32"), (["--budget", "nan"], "budget: 'nan'"),
    (["--budget", "inf"], "budget: 'inf'"), (["--budget=-1%"], "budget: fraction -0.01"),
    (["--budget", "1e400"], "budget: '1e400'"), (["--rank", "0"], "rank 0"),
])
def test_every_numeric_option_of_adapt_is_checked_before_any_work(tmp_path, capsys, options, fragment):
    code, lines = in_process(adapt_args(tmp_path / "job", *options), capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("peftadapt: error:") and fragment in lines[0], lines
    assert not (tmp_path / "job").exists()


def test_demo_refuses_bad_numbers_before_making_its_data(tmp_path, capsys):
    code, lines = in_process(["demo", "--steps", "0", "--output", str(tmp_path / "demo")], capsys)
    assert code == 2 and lines == ["peftadapt: error: train.steps: 0 must be a whole number ≥ 1"]
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("section, key, value, fragment", [
    ("train", "lr", 1e40, "train.lr: 1e+40"), ("train", "steps", float("nan"), "train.steps: nan"),
    ("train", "audit_every", 0, "train.audit_every: 0"), ("train", "patch_size", [64, 64, "64"], "train.patch_size"),
    ("train", "checkpoint_every", 2.5, "train.checkpoint_every: 2.5"), ("method", "rank", float("nan"), "rank nan"),
    ("method", "budget", {"fraction": float("inf")}, "budget: fraction inf"),
])
def test_every_number_of_a_hand_written_job_json_is_checked(template, tmp_path, section, key, value, fragment):
    job = tmp_path / "job"
    shutil.copytree(template, job)
    data = json.loads((job / "job.json").read_text())
    data[section][key] = value
    if key == "budget":
        data["method"] = {"name": "sea-peft", "budget": value}
    (job / "job.json").write_text(json.dumps(data))  # NaN and Infinity are written as JSON allows them
    with pytest.raises(InputError, match=fragment.replace("+", r"\+")):
        load_job(job)


class Diverging:
    """The supervised objective, broken from step `at` on as a diverging run breaks (on a GPU's bf16, a loss that
    overflows): a NaN loss, or a finite loss whose gradient is NaN (d√x/dx at 0), which makes the parameters NaN."""

    def __init__(self, inner: SupervisedObjective, at: int, what: str):
        self.inner, self.at, self.what, self.calls = inner, at, what, 0

    def loss(self, network, device):
        loss = self.inner.loss(network, device)
        self.calls += 1
        if self.calls < self.at:
            return loss
        if self.what == "loss":
            return loss * float("nan")
        trained = next(p for p in network.parameters() if p.requires_grad)
        return loss + (trained * 0).sum().abs().sqrt()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _diverging_method(method_name: str, what: str):
    @dataclass
    class DivergingLoRA(method_class("lora")):
        name = method_name
        label = f"Toy: LoRA whose {what} turns NaN at step 3"

        def build(self, context) -> Plan:
            plan = super().build(context)
            plan.objective = Diverging(SupervisedObjective(context.cases.support, context.card.patch_size,
                                                           context.patches_per_step, 0.5, context.seed), 3, what)
            return plan

    return register_method(DivergingLoRA)


_diverging_method("toy-nan-loss", "loss")
_diverging_method("toy-nan-gradient", "gradient")


@pytest.mark.parametrize("method, fragment", [("toy-nan-loss", "the loss is nan"),
                                              ("toy-nan-gradient", "is no longer finite")])
def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_finite_checkpoint(tmp_path, method, fragment):
    job = spec(steps=6, checkpoint_every=1)
    job.method = method_class(method)(rank=2)
    create_job(tmp_path, job)
    assert run_job(tmp_path, echo=False) == EXIT_FAILED
    failed = events(tmp_path)[-1]
    assert failed["event"] == "failed" and failed["exit_code"] == EXIT_FAILED
    assert "training stopped at step 3" in failed["message"] and fragment in failed["message"]
    assert "learning rate" in failed["message"] and "last checkpoint" in failed["message"]
    assert [e["step"] for e in events(tmp_path) if e["event"] == "checkpoint"] == [1, 2]
    saved = adapter_tensors(tmp_path / "checkpoint" / "adapter")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert json.loads((tmp_path / "checkpoint" / "adapter" / "adapter.json").read_text())["metadata"]["step"] == 2
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "traceback.txt").exists()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_the_audit_never_rewards_an_empty_prediction(tmp_path):
    """MeshNet grey/white matter (3 classes) on a real T1, audited against a reference holding white matter only:
    grey matter, absent from the reference, is not averaged in — neither as a free 1.0 for a network predicting
    nothing (the diverged state scored 0.5 before), nor as a 0 for the real network's grey matter."""
    from PEFTAdaptLib.data.cases import load_case
    from PEFTAdaptLib.inference import predict_probabilities
    from PEFTAdaptLib.models.registry import load_model

    model = load_model(shared("meshnet/model5_gw_ae"))
    t1 = sitk.ReadImage(str(shared("meshnet/t1_crop.nii.gz")))[80:176, 80:176, 80:176]  # 96³ of the brain: faster
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    case = load_case(tmp_path / "t1.nii.gz", model.card)
    prediction = predict_probabilities(model.network, case.array, model.card, "cpu").argmax(0)
    assert {1, 2} <= set(np.unique(prediction))
    white = sitk.GetImageFromArray(np.transpose(prediction == 1, (2, 1, 0)).astype(np.uint8))
    white.CopyInformation(case.image)  # the T1 is conformed already: its grid is the model's
    sitk.WriteImage(white, str(tmp_path / "white_matter.nii.gz"))
    case = load_case(tmp_path / "t1.nii.gz", model.card, tmp_path / "white_matter.nii.gz")
    assert set(np.unique(case.label)) == {0, 1}
    assert audit_dice(model.network, [case], model.card, "cpu") == pytest.approx(1.0)
    with torch.no_grad():
        for parameter in model.network.parameters():
            parameter.fill_(float("nan"))
    assert audit_dice(model.network, [case], model.card, "cpu") == 0.0


# -- 7: concurrent jobs, changed resumes, duplicate names, previous adapters ----------------------------------------
def test_a_second_adapt_never_touches_a_running_job(tmp_path):
    folder = tmp_path / "job"
    create_job(folder, spec(steps=200))
    before = digest(folder / "job.json") | digest(folder / "inputs")
    worker = subprocess.Popen([sys.executable, "-m", "PEFTAdaptLib.worker", str(folder)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(folder, lambda seen: any(e["event"] == "step" for e in seen))
        assert_one_line_error(peftadapt(*adapt_args(folder)), str(folder), "not empty")
        assert_one_line_error(peftadapt(*adapt_args(folder, "--overwrite")), str(folder), "a worker is running")
        assert digest(folder / "job.json") | digest(folder / "inputs") == before
    finally:
        worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=300) == EXIT_CANCELLED
    assert sum(e["event"] == "started" for e in events(folder)) == 1


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_killed_command_line_cancels_its_worker_as_ctrl_c_does(tmp_path, stop):
    """Found by a user-level check: `kill` (SIGTERM) or a closed terminal (SIGHUP) ended the command line and left
    its worker training on unattended, so a resume was refused ("a worker is already running this job")."""
    folder = tmp_path / "job"
    command = subprocess.Popen([str(PEFTADAPT), *adapt_args(folder, "--steps", "200", "--checkpoint-every", "1")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(folder, lambda seen: any(e["event"] == "checkpoint" for e in seen))
    command.send_signal(getattr(signal, stop))
    _, err = command.communicate(timeout=300)
    assert command.returncode == EXIT_CANCELLED, err
    assert "resume with: peftadapt adapt --resume" in err
    assert events(folder)[-1]["event"] == "cancelled" and not is_running(folder)


def test_a_patch_larger_than_every_training_volume_is_refused_before_training(tmp_path):
    """Found by a user-level check: `--patch-size 256` on a 60×55×52 volume trained on padding, 100 times slower."""
    image = sitk.ReadImage(str(shared("meshnet/t1_crop.nii.gz")))[100:140, 100:140, 100:140]
    label = sitk.Cast(image > float(np.percentile(sitk.GetArrayViewFromImage(image), 70)), sitk.sitkUInt8)
    sitk.WriteImage(image, str(tmp_path / "small.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "small_label.nii.gz"))
    result = peftadapt("adapt", "--model", str(shared("meshnet/model5_gw_ae")), "--method", "bitfit", "--train",
                       str(tmp_path / "small.nii.gz"), str(tmp_path / "small_label.nii.gz"), "--steps", "2",
                       "--patch-size", "64", "--device", "cpu", "--output", str(tmp_path / "job"))
    assert_one_line_error(result, "train.patch_size: [64, 64, 64] is larger than every training volume along every "
                                  "axis (the largest is 40×40×40 voxels", "give at most [40, 40, 40]")
    assert not any(e["event"] == "step" for e in events(tmp_path / "job"))


def test_a_worker_started_while_a_job_is_being_written_stops_with_exit_5_and_writes_nothing(tmp_path, monkeypatch):
    """The race of two requests for one folder: the first one's worker starts while the second is writing."""
    raced = {}
    write_spec = builder.write_spec

    def write_while_a_worker_starts(job_dir, request):
        raced["worker"] = subprocess.run([sys.executable, "-m", "PEFTAdaptLib.worker", str(job_dir)],
                                         capture_output=True, text=True, timeout=300)
        return write_spec(job_dir, request)

    monkeypatch.setattr(builder, "write_spec", write_while_a_worker_starts)
    folder = create_job(tmp_path / "job", spec(steps=2))
    assert raced["worker"].returncode == EXIT_LOCKED, raced["worker"].stderr
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "inputs", "job.json"]


def test_a_client_whose_worker_found_the_folder_locked_reports_it_without_taking_the_other_runs_events(tmp_path):
    folder = create_job(tmp_path / "job", spec(steps=2))
    with JobLock(folder):  # another worker (or builder) holds the folder
        (folder / "events.jsonl").write_text(json.dumps({"event": "finished", "time": 1.0}) + "\n")
        process = SubprocessRunner().start([str(folder)], folder, folder / "worker.log", folder / "worker.err.log")
        assert process.wait(timeout=300) == EXIT_LOCKED
        state = Job(folder, process).wait(timeout=30, interval=0.05)
    assert state.outcome == "failed" and "another worker is running this job" in state.message


def test_a_resume_of_a_changed_job_is_refused_naming_the_fields_and_a_finished_job_is_never_replaced(tmp_path):
    job = tmp_path / "job"
    create_job(job, spec(steps=2, checkpoint_every=1))
    assert run_job(job, echo=False) == EXIT_FINISHED
    original = (job / "job.json").read_text()
    checkpoint, adapter = digest(job / "checkpoint"), digest(job / "adapter")
    edited = json.loads(original)
    edited["train"]["lr"], edited["method"]["rank"] = 1e-3, 4
    (job / "job.json").write_text(json.dumps(edited))
    assert run_job(job, resume=True, echo=False) == EXIT_INVALID
    message = events(job)[-1]["message"]
    assert "changed since the checkpoint was written (method.rank, train.lr)" in message, message
    assert digest(job / "checkpoint") == checkpoint and digest(job / "adapter") == adapter

    (job / "job.json").write_text(original)
    with pytest.raises(InputError, match="not empty \\(it holds a job with its adapter\\)"):
        create_job(job, spec(steps=3))
    assert digest(job / "adapter") == adapter and (job / "job.json").read_text() == original


def test_inputs_of_one_file_name_are_named_after_the_folders_that_tell_them_apart(tmp_path):
    """BraTS, FreeSurfer and most exports keep one file name per patient folder: the predictions and warnings were
    `T1c_subtrMeanDivStd_seg` and `…_seg2`, which left the user to guess which patient each was."""
    request = JobSpec("deepbet-brain", task="predict", predict=[case(3, label=False), case(4, label=False)])
    assert request.predict[0].images[0].endswith("T1c_subtrMeanDivStd.nii.gz") and \
        request.predict[1].images[0].endswith("T1c_subtrMeanDivStd.nii.gz")
    create_job(tmp_path, request)
    assert [c.name for c in load_job(tmp_path).predict] == ["brats_2013_pat0003_1_T1c_subtrMeanDivStd",
                                                             "brats_2013_pat0004_1_T1c_subtrMeanDivStd"]
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    paths = [e["path"] for e in events(tmp_path) if e["event"] == "prediction"]
    assert paths == ["predictions/brats_2013_pat0003_1_T1c_subtrMeanDivStd_seg.nii.gz",
                     "predictions/brats_2013_pat0004_1_T1c_subtrMeanDivStd_seg.nii.gz"]
    first, second = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / p))) for p in paths)
    assert first.shape != second.shape or (first != second).any()  # two volumes, neither overwriting the other


def test_a_name_is_the_file_name_told_apart_by_the_nearest_folder_that_differs():
    names = distinct_names(["/d/bert/mri/norm.mgz", "/d/niivue/mri/norm.mgz", "/d/bert/mri/T1.mgz",
                            "/a/x/t1.nii", "/b/x/t1.nii", "/a/y/t1.nii", "/a/y/t1.nii"])
    assert names == {"/d/bert/mri/norm.mgz": "bert_norm", "/d/niivue/mri/norm.mgz": "niivue_norm",
                     "/d/bert/mri/T1.mgz": "T1",  # a name of its own needs no folder
                     # no one folder tells all three apart: their paths below the common folder do
                     "/a/x/t1.nii": "a_x_t1", "/b/x/t1.nii": "b_x_t1", "/a/y/t1.nii": "a_y_t1"}
    # a name a front-end gave another case (a re-adapt's earlier cases keep theirs) is not given again
    assert distinct_names(["/d/bert/mri/norm.mgz"], taken={"norm"}) == {"/d/bert/mri/norm.mgz": "mri_norm"}
    assert distinct_names(["/d/bert/norm.mgz"], taken={"niivue_norm"}) == {"/d/bert/norm.mgz": "bert_norm"}
    assert distinct_names(["/d/bert/norm.mgz"], taken={"normal"}) == {"/d/bert/norm.mgz": "norm"}


# -- 8 and 11: a killed worker is reported, and resumes with the command printed -----------------------------------
def test_a_killed_worker_is_reported_interrupted_and_resumes_with_the_printed_command(tmp_path, capsys):
    client = JobClient(tmp_path)
    job = client.submit(spec(steps=4, checkpoint_every=2))
    wait_for(job.folder, lambda seen: any(e["event"] == "step" and e["step"] >= 3 for e in seen))
    os.kill(job.process.pid, signal.SIGKILL)
    job.process.wait(timeout=60)

    status = json.loads((job.folder / "status.json").read_text())
    assert status["state"] == "running"  # as the worker left it: only the lock tells it is dead
    assert status["pid"] == job.process.pid and status["host"] == socket.gethostname()
    command = f"peftadapt adapt --resume --output {job.folder}"
    [info] = client.jobs()
    assert info.state == "interrupted" and command in info.message and f"PID {job.process.pid}" in info.message
    listed = peftadapt("jobs", "--work", str(tmp_path))
    assert listed.returncode == 0 and "interrupted" in listed.stdout and command in listed.stdout

    code, lines = in_process(["adapt", "--resume", "--output", str(job.folder), "--steps", "9"], capsys)
    assert code == 2 and lines == [f"peftadapt: error: --resume continues the job in {job.folder} as its "
                                   "job.json says; drop --steps"]
    resumed = peftadapt(*command.split()[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"adapter: {job.folder / 'adapter'}" in resumed.stdout
    started = [e for e in events(job.folder) if e["event"] == "started"]
    assert len(started) == 2 and started[-1]["resumed_from_step"] >= 2
    assert events(job.folder)[-1]["event"] == "finished" and client.jobs()[0].state == "finished"


# -- 10: output paths, adapters, internal errors --------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


OUTPUTS = {
    "a file": (lambda tmp: tmp / "file.txt", "exists and is not a folder"),
    "under a file": (lambda tmp: tmp / "file.txt" / "job", "file.txt is a file, not a folder"),
    "in /proc": (lambda tmp: Path("/proc/peftadapt-job"), "cannot be written in /proc"),
    "unwritable": (lambda tmp: _unwritable(tmp) / "job", "no write permission"),
}
as_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")


def _output(tmp_path: Path, kind: str) -> tuple[Path, str]:
    (tmp_path / "file.txt").write_text("not a folder")
    make, fragment = OUTPUTS[kind]
    return make(tmp_path), fragment


@pytest.mark.parametrize("kind", [k if k != "unwritable" else pytest.param(k, marks=as_root) for k in OUTPUTS])
def test_a_bad_adapt_output_ends_in_one_line_before_any_input_is_read(tmp_path, kind):
    output, fragment = _output(tmp_path, kind)
    missing = str(tmp_path / "missing.nii.gz")  # the output is checked first: this file is never looked at
    result = peftadapt("adapt", "--train", missing, missing, "--audit", missing, missing, "--output", str(output))
    assert result.returncode == 2
    assert_one_line_error(result, str(output), fragment)


@pytest.mark.parametrize("kind", [k if k != "unwritable" else pytest.param(k, marks=as_root) for k in OUTPUTS])
def test_a_bad_predict_output_ends_in_one_line_before_the_model_is_loaded(tmp_path, kind):
    output, fragment = _output(tmp_path, kind)
    if kind == "a file":
        output, fragment = tmp_path, "is a folder; give the output file"
    result = peftadapt("predict", "--model", str(tmp_path / "no-such-model"), "--image", IMAGE,
                       "--output", str(output / "seg.nii.gz") if kind != "a file" else str(output))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("kind", [k if k != "unwritable" else pytest.param(k, marks=as_root) for k in OUTPUTS])
def test_the_job_client_refuses_a_bad_work_or_job_folder_in_one_line(tmp_path, kind):
    output, fragment = _output(tmp_path, kind)
    request = spec(steps=2)
    with pytest.raises(InputError, match=fragment) as refused:
        JobClient(output).submit(request) if kind != "a file" else JobClient(tmp_path).submit(request, output)
    assert "\n" not in str(refused.value)


@pytest.fixture
def adapter(tmp_path, deepbet) -> Path:
    """A real LoRA adapter of the default model, on its first two convolutions."""
    config = LoRAConfig(r=1, alpha=1)
    add_units(deepbet.network, config, unit_class_for(config), "lora",
              layers=base_layer_names(deepbet.network, unit_class_for(config).layer_types)[:2])
    return save_adapters(deepbet.network, tmp_path / "adapter", deepbet.base_fingerprint)


def _entry(field, value):
    def change(config):
        config["units"][0][field] = value
    return change


@pytest.mark.parametrize("change, fragment", [
    (_entry("layer", "encoder.no_such_layer"), "no layer 'encoder.no_such_layer' that a lora unit can adapt"),
    (_entry("kind", "nope"), "unknown adapter type 'nope'"),
    (_entry("config", {"r": 1, "bogus": 2}), "TypeError"),
    (_entry("name", "a.b"), "needs a name without dots"),
    (lambda config: config.pop("units"), "no list of adapter units"),
    (lambda config: config["units"].__setitem__(0, "lora"), "invalid unit lora"),
])
def test_a_damaged_adapter_is_one_model_error_naming_its_file_and_changes_nothing(adapter, change, fragment):
    from PEFTAdaptLib.models.deepbet import load_deepbet

    config = json.loads((adapter / "adapter.json").read_text())
    change(config)
    (adapter / "adapter.json").write_text(json.dumps(config))
    model = load_deepbet()
    with pytest.raises(ModelError, match=fragment) as refused:
        load_adapters(model.network, adapter, model.base_fingerprint)
    assert str(refused.value).startswith(str(adapter / "adapter.json")) and "\n" not in str(refused.value)
    assert not list(iter_units(model.network))


def test_predict_with_an_adapter_naming_a_missing_layer_is_one_line(adapter, tmp_path):
    config = json.loads((adapter / "adapter.json").read_text())
    config["units"][0]["layer"] = "no_such_layer"
    (adapter / "adapter.json").write_text(json.dumps(config))
    result = peftadapt("predict", "--image", IMAGE, "--adapter", str(adapter), "--output", str(tmp_path / "s.nii.gz"))
    assert result.returncode == 2
    assert_one_line_error(result, str(adapter / "adapter.json"), "no layer 'no_such_layer'")


@pytest.mark.parametrize("made_for, named", [
    ("deepbet-brain", "it was made for model 'deepbet-brain'; give that model (--model)"),
    ("forged\nname" * 20, "it was made for model 'forged\\nname"),  # untrusted text: quoted, one line
])
def test_predict_with_an_adapter_of_another_model_names_the_model_it_was_made_for(adapter, tmp_path, made_for,
                                                                                   named):
    """The fingerprints alone do not tell the user which model to give; adapter.json records it as the worker
    writes it (`metadata.model`)."""
    config = json.loads((adapter / "adapter.json").read_text())
    config["metadata"]["model"] = made_for
    (adapter / "adapter.json").write_text(json.dumps(config))
    result = peftadapt("predict", "--model", str(shared("meshnet/model5_gw_ae")), "--image", IMAGE, "--adapter",
                       str(adapter), "--output", str(tmp_path / "s.nii.gz"))
    assert result.returncode == 2
    assert_one_line_error(result, str(adapter), "different base model (fingerprint ", " ≠ ", named)
    assert not (tmp_path / "s.nii.gz").exists()


def test_an_internal_error_leaves_its_traceback_in_the_job_folder_or_the_user_log_folder(tmp_path, template,
                                                                                        monkeypatch, capsys):
    """The last line of defence, reached by injecting a fault into a command (no known input reaches it)."""
    def broken(args):
        raise RuntimeError("injected fault")

    temporary = set(Path(tempfile.gettempdir()).glob("peftadapt-*.log"))
    monkeypatch.setenv("PEFTADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "cmd_adapt", broken)
    monkeypatch.setattr(cli, "cmd_models", broken)
    job = tmp_path / "job"
    shutil.copytree(template, job)
    code, lines = in_process(["adapt", "--resume", "--output", str(job)], capsys)
    assert code == 1 and lines == [f"peftadapt: internal error: RuntimeError: injected fault (traceback: "
                                   f"{job / 'cli-traceback.txt'})"]
    assert "injected fault" in (job / "cli-traceback.txt").read_text()
    code, lines = in_process(["models"], capsys)
    [log] = (tmp_path / "home" / "logs").glob("peftadapt-*.log")
    assert code == 1 and lines == [f"peftadapt: internal error: RuntimeError: injected fault (traceback: {log})"]
    assert set(Path(tempfile.gettempdir()).glob("peftadapt-*.log")) == temporary
