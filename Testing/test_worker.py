"""The background worker as the GUI uses it: real subprocesses, the real default model, real BraTS files."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import shared
from PEFTAdaptLib.checkpoint import JOB_KEY, STATE_FILE, latest_checkpoint
from PEFTAdaptLib.jobs import CaseSpec, JobSpec, TrainSpec, create_job
from PEFTAdaptLib.jobs.events import EventLog, read_events
from PEFTAdaptLib.methods import make_method
from PEFTAdaptLib.worker import EXIT_CANCELLED, EXIT_FINISHED, EXIT_INVALID, EXIT_LOCKED, run_job


def brats(case: int, name: str) -> str:
    return str(shared(f"brats/brats_2013_pat000{case}_1/{name}"))


def case(n: int, label: bool = True) -> CaseSpec:
    return CaseSpec([brats(n, "T1c_subtrMeanDivStd.nii.gz")], brats(n, "brainmask.nii.gz") if label else None)


def spec(steps=6, checkpoint_every=2, support=(3,), audit=4, **train) -> JobSpec:
    return JobSpec(
        model="deepbet-brain", support=[case(n) for n in support], audit=[case(audit)],
        method=make_method("lora", rank=2),
        train=TrainSpec(steps=steps, lr=3e-3, patch_size=[64, 64, 64], patches_per_step=1, audit_every=100,
                        checkpoint_every=checkpoint_every, seed=7, device="cpu", **train),
    )


def write_job(job_dir: Path, job: JobSpec) -> Path:
    """Through the job client's builder (inputs copied into the job folder), as every front-end does."""
    return create_job(job_dir, job)


def launch(job_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "PEFTAdaptLib.worker", str(job_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(job_dir: Path) -> list[dict]:
    return read_events(job_dir)[0]


def wait_for(job_dir: Path, predicate, timeout=300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = events(job_dir)
        if predicate(seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"timed out; events so far: {[e['event'] for e in events(job_dir)]}")


def adapter_tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A reference run, also the 'previous round' of the re-adapt test."""
    job = tmp_path_factory.mktemp("reference")
    write_job(job, spec())
    process = launch(job)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == EXIT_FINISHED, stderr
    assert '"event": "finished"' in stdout  # events are echoed on stdout too
    return job


def test_events_arrive_live_and_the_job_finishes(tmp_path):
    write_job(tmp_path, spec(steps=4))
    process = launch(tmp_path)
    live = wait_for(tmp_path, lambda seen: any(e["event"] == "step" for e in seen))
    assert process.poll() is None, "a step event was readable while the worker still ran"
    assert live[0]["event"] == "started" or live[0]["event"] == "audit"
    assert process.wait(timeout=600) == EXIT_FINISHED
    kinds = [e["event"] for e in events(tmp_path)]
    for kind in ("started", "audit", "step", "checkpoint", "validation", "finished"):
        assert kind in kinds
    steps = [e for e in events(tmp_path) if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["eta_s"] >= 0 for e in steps)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


def test_cancel_keeps_a_loadable_checkpoint_and_reports_cancelled(tmp_path):
    write_job(tmp_path, spec(steps=200, checkpoint_every=2))
    process = launch(tmp_path)
    wait_for(tmp_path, lambda seen: any(e["event"] == "checkpoint" for e in seen))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_CANCELLED
    last = events(tmp_path)[-1]
    assert last["event"] == "cancelled" and last["step"] < 200
    # it says which state its adapter holds (the command line printed the last audit's Dice as "kept")
    metadata = json.loads((tmp_path / "adapter" / "adapter.json").read_text())["metadata"]
    assert last["kept"] == "start" and metadata["best_step"] == 0 and metadata["final"] is False
    first_audit = next(e for e in events(tmp_path) if e["event"] == "audit")
    assert last["best_dice"] == first_audit["dice"]  # the held state's Dice: what the jobs lists show
    assert last["message"] == (f"cancelled at step {last['step']}; no state passed the selection rule so far: the "
                               "adapter is the source model")
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and adapter_tensors(checkpoint / "adapter")
    # and it resumes from there
    (tmp_path / "cancel").touch()  # a stale cancel request: resuming clears it instead of stopping at once
    resumed = launch(tmp_path, "--resume")
    wait_for(tmp_path, lambda seen: sum(e["event"] == "started" for e in seen) == 2 and seen[-1]["event"] == "step")
    (tmp_path / "cancel").touch()  # the cancel file works too
    assert resumed.wait(timeout=300) == EXIT_CANCELLED
    started = [e for e in events(tmp_path) if e["event"] == "started"]
    assert started[-1]["resumed_from_step"] == last["step"]
    assert events(tmp_path)[-1]["step"] > last["step"]


def test_a_line_cut_short_by_a_kill_does_not_swallow_the_next_sessions_first_event(tmp_path):
    """Found by a user-level check: the resumed session's `started` was glued onto a cut line and lost, so the
    summary had no method, trainable count or true start Dice."""
    (tmp_path / "events.jsonl").write_text(json.dumps({"event": "step", "step": 1}) + '\n{"event": "st')
    EventLog(tmp_path, echo=False)({"event": "started", "resumed_from_step": 1})
    assert [e["event"] for e in events(tmp_path)] == ["step", "started"]


@pytest.mark.parametrize("swap", ["step", "job"])
def test_a_trainer_state_of_another_step_or_job_is_refused(tmp_path, uninterrupted, swap):
    """Found by a user-level check: another job's trainer_state.pt copied into a checkpoint resumed as if it were
    this job's (its step, its history, its result) and was reported as this job's."""
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "checkpoint" / STATE_FILE
    state = torch.load(path, weights_only=True)
    state["step" if swap == "step" else JOB_KEY] = state["step"] - 2 if swap == "step" else "0" * 64
    torch.save(state, path)
    process = launch(tmp_path, "--resume")
    assert process.wait(timeout=600) == EXIT_INVALID
    failed = events(tmp_path)[-1]
    assert failed["event"] == "failed" and failed["message"].startswith(f"{path}: not this checkpoint's trainer state")


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    write_job(tmp_path, spec())
    process = launch(tmp_path)
    wait_for(tmp_path, lambda seen: any(e["event"] == "step" and e["step"] >= 3 for e in seen))
    process.kill()  # SIGKILL: no handler runs
    process.wait(timeout=60)
    assert not any(e["event"] in ("finished", "cancelled") for e in events(tmp_path))
    resumed = launch(tmp_path, "--resume")
    assert resumed.wait(timeout=600) == EXIT_FINISHED
    started = [e for e in events(tmp_path) if e["event"] == "started"]
    assert started[-1]["resumed_from_step"] >= 2
    # the start score travels in the checkpoint: a summary whose log lost the first audit still compares with it
    first_audit = next(e for e in events(tmp_path) if e["event"] == "audit")
    assert first_audit["step"] == 0 and started[-1]["start_dice"] == first_audit["dice"]
    ours, reference = adapter_tensors(tmp_path / "adapter"), adapter_tensors(uninterrupted / "adapter")
    assert ours.keys() == reference.keys()
    for key in ours:  # stated tolerance (docs/worker.md): 1e-5 absolute
        assert np.allclose(ours[key].numpy(), reference[key].numpy(), atol=1e-5), key


def test_a_job_killed_after_its_last_checkpoint_resumes_saying_it_chooses_the_state_to_keep(tmp_path, uninterrupted):
    job = tmp_path / "job"
    shutil.copytree(uninterrupted, job)
    logged = (job / "events.jsonl").read_text().splitlines(keepends=True)
    last_checkpoint = max(i for i, line in enumerate(logged) if '"event": "checkpoint"' in line)
    (job / "events.jsonl").write_text("".join(logged[:last_checkpoint + 1]))  # killed before the verdict
    resumed = launch(job, "--resume")
    assert resumed.wait(timeout=600) == EXIT_FINISHED
    session = events(job)[last_checkpoint + 1:]
    kinds = [e.get("phase", e["event"]) for e in session]
    assert session[0]["event"] == "started" and session[0]["resumed_from_step"] == 6
    assert "step" not in kinds and kinds.index("choosing") < kinds.index("validation")


def test_a_cancel_while_the_job_chooses_its_state_stops_there_and_a_resume_finishes_the_job(tmp_path):
    """Found by a user-level check: a cancel while the job chose the state to keep (the final audits, minutes on a
    whole-brain audit) waited for them and the verdict, and without predictions to stop the job finished anyway."""
    job = spec(steps=2)
    job.predict = [case(5, label=False)]
    write_job(tmp_path, job)
    process = launch(tmp_path)
    wait_for(tmp_path, lambda seen: any(e.get("phase") == "choosing" for e in seen))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_CANCELLED
    log = events(tmp_path)
    assert log[-1]["event"] == "cancelled" and log[-1]["step"] == 2
    assert log[-1]["message"].startswith("cancelled while choosing the state to keep, after the last step; ")
    assert not any(e["event"] in ("validation", "prediction") for e in log)
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["metadata"]["final"] is False

    assert launch(tmp_path, "--resume").wait(timeout=600) == EXIT_FINISHED  # from the last step's checkpoint
    session = events(tmp_path)[len(log):]
    assert not any(e["event"] == "step" for e in session)
    assert [e["event"] for e in session if e["event"] in ("validation", "prediction", "finished")] == [
        "validation", "prediction", "finished"]
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["metadata"]["final"] is True


def test_a_cancel_while_segmenting_stops_the_predictions_and_says_so_keeping_the_final_adapter(tmp_path):
    """Found by a user-level check: a Ctrl-C after the last step skipped the predictions it was asked for, and the
    job still said `finished`, exit 0, with nothing segmented."""
    job = spec(steps=2)
    job.predict = [case(n, label=False) for n in (5, 6, 3)]
    write_job(tmp_path, job)
    process = launch(tmp_path)
    wait_for(tmp_path, lambda seen: any(e["event"] == "prediction" for e in seen))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_CANCELLED
    last = events(tmp_path)[-1]
    done = len([e for e in events(tmp_path) if e["event"] == "prediction"])
    assert last["event"] == "cancelled" and 1 <= done < 3
    assert last["message"].startswith(f"cancelled while segmenting, {done} of 3 volume(s) done; the training had "
                                      "finished")
    validation = next(e for e in events(tmp_path) if e["event"] == "validation")
    assert last["kept"] == validation["kept"] and last["best_dice"] == validation["dice"]
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["metadata"]["final"] is True
    assert len(list((tmp_path / "predictions").glob("*_seg.nii.gz"))) == done


def test_two_jobs_run_side_by_side_and_one_job_takes_one_worker(tmp_path):
    """The first job is long and cancelled once the second worker was refused: with 3 steps it once finished before
    that worker had started (a loaded CI machine), which then found nothing to lock."""
    first, second = tmp_path / "a", tmp_path / "b"
    write_job(first, spec(steps=200))
    write_job(second, spec(steps=3))
    a, b = launch(first), launch(second)
    wait_for(first, lambda seen: len(seen) > 0)
    intruder = launch(first)
    assert intruder.wait(timeout=120) == EXIT_LOCKED
    assert b.wait(timeout=600) == EXIT_FINISHED and events(second)[-1]["event"] == "finished"
    assert a.poll() is None, "the first job ran beside the second"
    (first / "cancel").touch()
    assert a.wait(timeout=300) == EXIT_CANCELLED and events(first)[-1]["event"] == "cancelled"


def test_readapt_starts_from_the_previous_adapter_and_keeps_it_without_a_reliable_gain(tmp_path, uninterrupted):
    """A re-adapt round is judged against the adapter it started from: 12 more steps move the audit by a fraction
    of a point (below the selection rule's minimum gain), so the previous adapter is kept, the user is told, and the
    new round's predictions are exactly the previous adapter's."""
    previous_final = next(e for e in events(uninterrupted) if e["event"] == "validation")["dice"]
    job = spec(steps=12, support=(3, 6))  # case 6: the "corrected" volume, added for the new round
    job.warm_start = str(uninterrupted / "adapter")
    job.predict = [case(6, label=False)]
    write_job(tmp_path, job)
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    audits = [e for e in events(tmp_path) if e["event"] == "audit"]
    assert audits[0]["step"] == 0 and audits[0]["dice"] == pytest.approx(previous_final, abs=1e-9)
    assert audits[-1]["step"] == 12 and not audits[-1]["reliable"]
    finished = events(tmp_path)[-1]
    assert finished["kept"] == "start" and "kept" in finished["message"]

    from PEFTAdaptLib.models.deepbet import load_deepbet
    from PEFTAdaptLib.adapters import load_adapters
    from PEFTAdaptLib.pipeline import predict_file

    before = load_deepbet()
    load_adapters(before.network, uninterrupted / "adapter", before.base_fingerprint)
    _, old = predict_file(before, [brats(6, "T1c_subtrMeanDivStd.nii.gz")], tmp_path / "old.nii.gz")
    new = sitk.ReadImage(str(tmp_path / "predictions" / "brats_2013_pat0006_1_T1c_subtrMeanDivStd_seg.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(new), sitk.GetArrayFromImage(old))


def _bad_job(tmp_path: Path, mutate) -> tuple[int, list[dict], set[str]]:
    """A job.json written by hand (not through the builder, which refuses most of these first): the worker must
    refuse it too, before any training or output."""
    job = spec(steps=2).to_dict()
    mutate(job, tmp_path)
    (tmp_path / "job.json").write_text(json.dumps(job))
    code = run_job(tmp_path, echo=False)
    return code, events(tmp_path), {p.name for p in tmp_path.iterdir()}


def _write(path: Path, array: np.ndarray, like: str | None = None) -> str:
    image = sitk.GetImageFromArray(array)
    if like:
        image.CopyInformation(sitk.ReadImage(like))
    sitk.WriteImage(image, str(path))
    return str(path)


def _shifted_label(job, tmp):
    label = sitk.ReadImage(brats(3, "brainmask.nii.gz"))
    label.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(label, str(tmp / "moved.nii.gz"))
    job["support"][0]["label"] = str(tmp / "moved.nii.gz")


def _label_values(job, tmp):
    mask = sitk.GetArrayFromImage(sitk.ReadImage(brats(3, "brainmask.nii.gz"))).astype(np.uint8) * 7
    job["support"][0]["label"] = _write(tmp / "sevens.nii.gz", mask, brats(3, "brainmask.nii.gz"))


def _empty_label(job, tmp):
    empty = np.zeros(sitk.GetArrayFromImage(sitk.ReadImage(brats(3, "brainmask.nii.gz"))).shape, np.uint8)
    job["support"][0]["label"] = _write(tmp / "empty.nii.gz", empty, brats(3, "brainmask.nii.gz"))


def _nan_image(job, tmp):
    array = sitk.GetArrayFromImage(sitk.ReadImage(brats(3, "T1c_subtrMeanDivStd.nii.gz")))
    array[70, 100, 100] = np.inf
    job["support"][0]["images"] = [_write(tmp / "inf.nrrd", array, brats(3, "T1c_subtrMeanDivStd.nii.gz"))]


def _two_channels(job, tmp):
    job["support"][0]["images"] = job["support"][0]["images"] * 2


def _flat_image(job, tmp):
    job["audit"][0]["images"] = [_write(tmp / "flat.nii.gz", np.random.rand(40, 40).astype(np.float32))]


def _missing(job, tmp):
    job["audit"][0]["label"] = str(tmp / "absent_mask.nii.gz")


def _corrupt(job, tmp):
    (tmp / "broken.nrrd").write_text("NRRD0004\ntype: float\nsizes: 9 9\n")
    job["support"][0]["images"] = [str(tmp / "broken.nrrd")]


def _budget_zero(job, tmp):
    job["method"] = {"name": "lora", "budget": {"fraction": 0}}


def _budget_too_big(job, tmp):
    job["method"] = {"name": "sea-peft", "budget": {"count": 10_000_000}}


def _rank_over_budget(job, tmp):
    job["method"] = {"name": "lora", "rank": 32, "budget": {"fraction": 0.001}}


def _lr_nan(job, tmp):
    job["train"]["lr"] = float("nan")


def _patch_too_small(job, tmp):
    job["train"]["patch_size"] = [32, 32, 32]  # one voxel at deepbet's bottleneck: its instance norms cannot train


def _unknown_model(job, tmp):
    job["model"] = "no-such-model"


def _escape(job, tmp):
    job["support"][0]["images"] = ["../../etc/passwd.nii.gz"]


@pytest.mark.parametrize("mutate, fragment", [
    (_shifted_label, "moved.nii.gz: label geometry"),
    (_label_values, "sevens.nii.gz: label values [7]"),
    (_empty_label, "empty.nii.gz: label is empty"),
    (_nan_image, "inf.nrrd: image contains NaN or infinite"),
    (_two_channels, "2 image channel(s) given"),
    (_flat_image, "flat.nii.gz: image has size (40, 40); model 'deepbet-brain' is 3D"),
    (_missing, "absent_mask.nii.gz: label file not found"),
    (_corrupt, "broken.nrrd: cannot read image"),
    (_budget_zero, "budget: fraction 0 must be"),
    (_budget_too_big, "budget: 10,000,000 parameters is more than the model's 2,126,258"),
    (_rank_over_budget, "rank 32 trains"),
    (_lr_nan, "train.lr: nan must be a finite number"),
    (_patch_too_small, "train.patch_size: [32, 32, 32]: model 'deepbet-brain' trains on edges that are multiples of "
                       "32 and at least 64 voxels"),
    (_unknown_model, "unknown model 'no-such-model'"),
    (_escape, "escapes the job folder"),
])
def test_bad_input_is_refused_before_training_and_writes_only_the_event_log(tmp_path, mutate, fragment):
    code, seen, files = _bad_job(tmp_path, mutate)
    assert code == EXIT_INVALID
    assert [e["event"] for e in seen] == ["failed"]
    assert fragment in seen[0]["message"]
    created_by_test = {"moved.nii.gz", "sevens.nii.gz", "empty.nii.gz", "inf.nrrd", "flat.nii.gz", "broken.nrrd"}
    assert files - created_by_test == {"job.json", "events.jsonl", "status.json", ".lock"}


def test_unwritable_job_folder_is_reported(tmp_path, capsys):
    write_job(tmp_path, spec())
    (tmp_path / "events.jsonl").mkdir()  # the event log cannot be opened: as in a read-only folder
    assert run_job(tmp_path, echo=False) == EXIT_INVALID
    assert "events.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("method, rank, kind", [("salt", 2, "salt"), ("convlora", 2, "convlora"),
                                               ("norm-affine", None, "norm_affine")])
def test_fixed_methods_run_through_the_worker(tmp_path, method, rank, kind):
    job = spec(steps=2)
    job.method = make_method(method, **({"rank": rank} if rank else {}))
    write_job(tmp_path, job)
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    started = next(e for e in events(tmp_path) if e["event"] == "started")
    assert started["method"] == method and 0 < started["trainable"] < 0.05 * started["total"]
    saved = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert {u["kind"] for u in saved["units"]} == {kind}
