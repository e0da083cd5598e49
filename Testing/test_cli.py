"""The `peftadapt` console script: help, model list, and one-line errors naming the bad file (exit code ≠ 0)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, RunState, create_job, read_events
from PEFTAdaptLib.methods import make_method
from PEFTAdaptLib.mrml.logic import SceneLogic

MESHNET = "meshnet/model5_gw_ae"

# the console script pip installed beside this interpreter (the venv need not be activated)
PEFTADAPT = Path(sys.executable).with_name("peftadapt.exe" if sys.platform == "win32" else "peftadapt")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert PEFTADAPT.is_file(), f"{PEFTADAPT}: the peftadapt console script is installed by `pip install -e .`"
    return subprocess.run([str(PEFTADAPT), *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("command", ["adapt", "predict", "demo", "models"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: peftadapt" in result.stdout


def test_models_lists_the_default_model_as_available():
    result = run("models")
    assert result.returncode == 0
    assert "deepbet-brain (default)" in result.stdout and "status: available" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftadapt: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_image_is_named(tmp_path):
    missing = tmp_path / "nowhere.nii.gz"
    assert_one_line_error(run("predict", "--image", str(missing), "--output", str(tmp_path / "o.nii.gz")),
                          str(missing), "not found")


def test_2d_image_is_refused(tmp_path):
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), str(flat))
    assert_one_line_error(run("predict", "--image", str(flat), "--output", str(tmp_path / "o.nii.gz")),
                          str(flat), "2D")


def test_label_of_another_size_is_refused(tmp_path):
    brats = shared("brats/brats_2013_pat0003_1")
    image = str(brats / "T1c_subtrMeanDivStd.nii.gz")
    label = sitk.ReadImage(str(brats / "brainmask.nii.gz"))[:, :, :100]
    wrong = tmp_path / "cropped_mask.nii.gz"
    sitk.WriteImage(label, str(wrong))
    result = run("adapt", "--train", image, str(wrong), "--audit", image, str(brats / "brainmask.nii.gz"),
                 "--output", str(tmp_path / "out"), "--steps", "1")
    assert_one_line_error(result, str(wrong), "differs from image")
    assert not (tmp_path / "out" / "adapter").exists()


def test_nan_intensities_are_refused(tmp_path):
    image = sitk.ReadImage(str(shared("spine/t2/t2.nii.gz")), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(broken, str(path))
    assert_one_line_error(run("predict", "--image", str(path), "--output", str(tmp_path / "o.nii.gz")),
                          str(path), "NaN")


def test_corrupt_file_is_named(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    assert_one_line_error(run("predict", "--image", str(corrupt), "--output", str(tmp_path / "o.nii.gz")),
                          str(corrupt), "cannot read")


@pytest.mark.parametrize("option, value", [("--steps", "abc"), ("--patch-size", "32,32,32,32"), ("--method", "loraa")])
def test_a_mistyped_option_is_one_line_naming_it(tmp_path, option, value):
    """Found by a user-level check: these printed argparse's 13-line usage block."""
    assert_one_line_error(run("adapt", "--train", "a.nii.gz", "b.nii.gz", option, value, "--output", str(tmp_path)),
                          option, value, "see: peftadapt adapt --help")


def test_a_warning_during_training_gets_a_line_of_its_own(capsys):
    """Found running the demo: the one-volume caveat was printed right after the progress bar's text, on its line."""
    from PEFTAdaptLib.cli import TqdmProgress

    progress = TqdmProgress("adapting")
    progress([{"event": "step", "step": 1, "steps": 3, "loss": 1.0}, {"event": "warning", "message": "check it"},
              {"event": "step", "step": 2, "steps": 3, "loss": 0.5}])
    progress.close()
    err = capsys.readouterr().err
    before, _, _ = err.partition("peftadapt: warning: check it\n")
    assert before and before[-1] in "\r\n", repr(err)


def test_the_progress_bar_ends_on_the_kept_states_audit_and_the_workers_time_estimate(capsys):
    """Found by a user-level check: the bar ended on the last audit (0.794) while the summary said kept 0.897, and
    showed tqdm's rate of events arriving in bursts ("8905.10step/s")."""
    from PEFTAdaptLib.cli import TqdmProgress

    progress = TqdmProgress("adapting")
    progress([{"event": "audit", "step": 0, "dice": 0.794},
              {"event": "step", "step": 1, "steps": 2, "loss": 1.0, "eta_s": 75.0},
              {"event": "step", "step": 2, "steps": 2, "loss": 0.5, "eta_s": 0.0},
              {"event": "validation", "step": 2, "dice": 0.897}])
    progress.close()
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "audit_dice=0.897" in last and "left=0:00" in last
    assert "left=1:15" in err and "step/s" not in err


def test_the_bar_says_training_from_the_first_steps_loss_on(capsys):
    """Found by a user-level check: the bar showed the first step's loss, and the step count at 0, beside
    "auditing the starting model"; the phase's words went only at the next refresh."""
    from PEFTAdaptLib.cli import TqdmProgress

    progress = TqdmProgress("adapting")
    progress([{"event": "started", "task": "adapt", "steps": 3, "resumed_from_step": 0},
              {"event": "phase", "phase": "auditing", "step": 0}, {"event": "audit", "step": 0, "dice": 0.5},
              {"event": "step", "step": 1, "steps": 3, "loss": 1.25, "eta_s": 4.0}])
    progress.close()
    shown = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any("auditing the starting model" in line for line in shown)
    assert not [line for line in shown if "loss=1.250" in line and ("auditing" in line or " 0/3 " in line)], shown


def _slabs_in_folders(tmp_path: Path, *folders: str) -> list[tuple[Path, Path]]:
    """A 40-slice slab of meshnet/t1_crop saved as `<folder>/t1.nii.gz` in each folder (one file name, as a
    patient folder layout has it), each slab of its own slices, with a mask of its brightest 30 % (`mask.nii.gz`)."""
    scan = sitk.ReadImage(str(shared("meshnet/t1_crop.nii.gz")))
    pairs = []
    for index, folder in enumerate(folders):
        image = scan[:, :, 20 + 40 * index:60 + 40 * index]
        mask = sitk.Cast(image > float(np.percentile(sitk.GetArrayViewFromImage(image), 70)), sitk.sitkUInt8)
        mask.CopyInformation(image)
        path = tmp_path / folder / "t1.nii.gz"
        path.parent.mkdir(parents=True)
        sitk.WriteImage(image, str(path))
        sitk.WriteImage(mask, str(path.with_name("mask.nii.gz")))
        pairs.append((path, path.with_name("mask.nii.gz")))
    return pairs


def test_labels_in_another_numbering_are_mapped_onto_the_models_classes_by_a_label_map(tmp_path):
    """FreeSurfer's aseg numbers white matter 2/41 and cortex 3/42 (parcels 1000-2999): a user had to rewrite every
    label file in the model's numbering by hand (`peftadapt adapt` refused them, asking whether they were images)."""
    middle, upper = _slabs_in_folders(tmp_path, "middle", "upper")
    for image, mask in (middle, upper):  # the mask's left half white matter (2), right half left cortex (3, 1035)
        inside = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) > 0
        aseg = np.where(inside, 2, 24).astype(np.int16)  # 24: CSF, no class of the model
        half = aseg.shape[2] // 2
        aseg[:, :, half:][inside[:, :, half:]] = 3
        aseg[:, :, half:half + 10][inside[:, :, half:half + 10]] = 1035
        written = sitk.GetImageFromArray(aseg)
        written.CopyInformation(sitk.ReadImage(str(image)))
        sitk.WriteImage(written, str(mask.with_name("aseg.nii.gz")))
    label_map = tmp_path / "gw.json"
    label_map.write_text(json.dumps({"white matter": 2, "Grey Matter": [3, 42, "1000-2999"]}))  # one value: no list
    refused = run("adapt", "--model", str(shared(MESHNET)), "--train", str(upper[0]),
                  str(upper[1].with_name("aseg.nii.gz")), "--output", str(tmp_path / "refused"))
    assert_one_line_error(refused, "label values [3, 24, 1035] are not classes of this model (known: [0, 1, 2]); "
                                   "labels in another numbering (a label map maps them onto the model's "
                                   "classes: the command line's --label-map, the label map of the browser app or "
                                   "the Slicer panel)")
    # a request refused after the labels were mapped (and the budget read) is one line, its error
    later = run("adapt", "--model", str(shared(MESHNET)), "--budget", "1%", "--label-map", str(label_map), "--train",
                str(upper[0]), str(upper[1].with_name("aseg.nii.gz")), "--predict", str(tmp_path / "nowhere.nii.gz"),
                "--output", str(tmp_path / "later"))
    assert_one_line_error(later, "nowhere.nii.gz")
    adapted = run("adapt", "--model", str(shared(MESHNET)), "--method", "bitfit", "--label-map", str(label_map),
                  "--train", str(upper[0]), str(upper[1].with_name("aseg.nii.gz")), "--audit", str(middle[0]),
                  str(middle[1].with_name("aseg.nii.gz")), "--steps", "1", "--patch-size", "32",
                  "--output", str(tmp_path / "job"))
    assert adapted.returncode == 0, adapted.stderr
    assert (f"peftadapt: label map {label_map}: White Matter ← 2; Grey Matter ← 3, 42, 1000-2999; any other "
            "value → background") in adapted.stderr
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    for case, (_, given) in zip(job["support"] + job["audit"], (upper, middle)):
        aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(given.with_name("aseg.nii.gz"))))
        held = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "job" / case["label"])))
        assert np.array_equal(held, np.select([aseg == 2, np.isin(aseg, (3, 1035))], [1, 2], 0))

    for entries, said in (({"White": [2]}, "'White' is not a class of model 'model5_gw_ae' (its classes: "
                                           "background, White Matter, Grey Matter)"),
                          ({"White Matter": [2, "1000-2999"], "Grey Matter": ["1030-1040"]},
                           "value 1030 is listed for two classes"),
                          ({"White Matter": ["2-"]}, "'White Matter' must give the values that stand for it"),
                          ({"White Matter": 2.5}, "'White Matter' must give the values that stand for it")):
        label_map.write_text(json.dumps(entries))
        assert_one_line_error(run("adapt", "--model", str(shared(MESHNET)), "--label-map", str(label_map), "--train",
                                  str(upper[0]), str(upper[1].with_name("aseg.nii.gz")), "--output",
                                  str(tmp_path / "refused")), f"{label_map}: {said}")
    label_map.write_text(json.dumps({"White Matter": [41]}))  # a value none of the voxels holds
    assert_one_line_error(run("adapt", "--model", str(shared(MESHNET)), "--label-map", str(label_map), "--train",
                              str(upper[0]), str(upper[1].with_name("aseg.nii.gz")), "--output",
                              str(tmp_path / "refused")),
                          f"{upper[1].with_name('aseg.nii.gz')}: no voxel holds a value that {label_map} gives a class")
    assert not (tmp_path / "refused").exists()


def test_predict_with_an_adapter_whose_run_kept_the_source_says_the_segmentation_is_the_source_models(tmp_path):
    """Found by a user-level check: `predict --adapter` with the adapter of a run that found no reliable gain wrote
    the source model's segmentation (and an all-zero disagreement map) as if it were an adapted one."""
    middle, upper = _slabs_in_folders(tmp_path, "middle", "upper")
    adapted = run("adapt", "--model", str(shared(MESHNET)), "--method", "bitfit", "--train", *map(str, upper),
                  "--audit", *map(str, middle), "--steps", "2", "--lr", "1e-12", "--patch-size", "32",
                  "--output", str(tmp_path / "job"))
    assert adapted.returncode == 0 and "the source model is kept" in adapted.stdout, adapted.stderr
    predicted = run("predict", "--model", str(shared(MESHNET)), "--adapter", str(tmp_path / "job"), "--image",
                    str(middle[0]), "--output", str(tmp_path / "seg.nii.gz"))
    assert predicted.returncode == 0, predicted.stderr
    assert "peftadapt: warning: the adapter is the source model itself" in predicted.stderr
    # a re-adapt that keeps the adapter it started from, which was the source itself, is the source itself too
    again = run("adapt", "--readapt", str(tmp_path / "job"), "--train", *map(str, upper), "--slices", "axial:10",
                "--steps", "1", "--lr", "1e-12", "--patch-size", "32", "--output", str(tmp_path / "round2"))
    assert again.returncode == 0 and "the adapter it started from is kept" in again.stdout, again.stderr
    assert json.loads((tmp_path / "round2" / "adapter" / "adapter.json").read_text())["metadata"]["source_kept"]


def test_after_the_last_step_the_command_line_and_the_panels_say_the_job_is_choosing_then_predicting(tmp_path):
    """The final audits, SEA-PEFT's final sweep and the predictions come after the last step: the bar stood at 100 %
    with 0:00 left, and the panels said "Training, step N/N", for as long as they took."""
    farther, middle, upper = _slabs_in_folders(tmp_path, "farther", "middle", "upper")
    result = run("adapt", "--model", str(shared(MESHNET)), "--method", "bitfit", "--train", *map(str, upper),
                 "--audit", *map(str, middle), "--predict", str(farther[0]), "--steps", "2", "--audit-every", "1",
                 "--patches-per-step", "1", "--device", "cpu", "--output", str(tmp_path / "job"))
    assert result.returncode == 0, result.stderr
    assert "adapting (choosing the state to keep)" in result.stderr
    # the bar is there from the start, saying what takes long before the first step and within the choosing
    assert "adapting (auditing the starting model)" in result.stderr
    assert "adapting (choosing the state to keep: auditing the last step's state)" in result.stderr
    assert "adapting (predicting 1 volume(s))" in result.stderr

    log = read_events(tmp_path / "job")[0]
    kinds = [e["event"] if e["event"] != "phase" else e["phase"] for e in log]
    last_step = max(i for i, kind in enumerate(kinds) if kind == "step")
    assert kinds[last_step + 1] == "choosing" and kinds.index("choosing") < kinds.index("validation")
    assert kinds.index("validation") < kinds.index("predicting") < kinds.index("prediction")
    state = RunState()
    for event in log[:last_step + 2]:
        state.update(event)
    assert state.describe().startswith("Choosing the state to keep, step 2/2") and "left" not in state.describe()


def test_predict_segments_several_volumes_into_a_folder_named_after_their_own_folders(tmp_path):
    """A clinician segments their cohort with the adapted model: `predict` took one --image, so each volume was a
    command of its own, loading the model again."""
    images = [image for image, _ in _slabs_in_folders(tmp_path, "pat1/anat", "pat2/anat")]
    model = str(shared(MESHNET))
    result = run("predict", "--model", model, "--image", str(images[0]), "--image", str(images[1]),
                 "--output", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    written = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines()]
    assert [p.name for p in written if "_seg" in p.name] == ["pat1_t1_seg.nii.gz", "pat2_t1_seg.nii.gz"]
    assert all(p.parent == tmp_path / "out" and p.is_file() for p in written) and len(written) == 6  # + their maps
    for image, name in zip(images, ("pat1", "pat2")):
        segmentation = sitk.ReadImage(str(tmp_path / "out" / f"{name}_t1_seg.nii.gz"))
        assert segmentation.GetOrigin() == sitk.ReadImage(str(image)).GetOrigin()  # each of its own volume

    (tmp_path / "taken.nii.gz").write_text("")
    refused = run("predict", "--model", model, "--image", str(images[0]), "--image", str(images[1]),
                  "--output", str(tmp_path / "taken.nii.gz"))
    assert_one_line_error(refused, "taken.nii.gz: is a file; with several --image give the folder")


def test_a_cancelled_predict_keeps_the_volumes_it_segmented_and_offers_no_resume_of_its_scratch_job(tmp_path):
    """It told the user to `adapt --resume` a scratch folder that the command had just deleted."""
    images = [image for image, _ in _slabs_in_folders(tmp_path, "a", "b", "c", "d")]
    command = [str(PEFTADAPT), "predict", "--model", str(shared(MESHNET)), "--device", "cpu",
               "--output", str(tmp_path / "out")] + [arg for image in images for arg in ("--image", str(image))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)})  # its scratch job folder: watched here
    deadline = time.monotonic() + 300
    while not any('"event": "prediction"' in log.read_text() for log in tmp_path.glob("peftadapt-predict-*/job/"
                                                                                       "events.jsonl")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 4, err  # cancelled
    segmented = [line.removeprefix("wrote ") for line in out.splitlines() if "_seg" in line]
    assert 1 <= len(segmented) < 4 and all(Path(p).is_file() for p in segmented)
    assert f"peftadapt: cancelled: {len(segmented)} of 4 volume(s) segmented" in err and "resume" not in err


def test_readapt_continues_a_finished_job_from_its_adapter_with_the_corrected_cases(tmp_path):
    """The panels re-adapt from the last adapter with the corrected volumes; the command line could only start
    again from the source model, so a correction loop run from a script lost every earlier round."""
    (first, first_mask), (corrected, corrected_mask) = _slabs_in_folders(tmp_path, "first", "corrected")
    masks = [first_mask, corrected_mask]
    common = ("--steps", "2", "--audit-every", "1", "--patches-per-step", "1", "--patch-size", "32", "--device", "cpu")
    done = run("adapt", "--model", str(shared(MESHNET)), "--method", "bitfit", "--train", str(first),
               str(masks[0]), "--predict", str(corrected), *common, "--output", str(tmp_path / "round1"))
    assert done.returncode == 0, done.stderr

    again = run("adapt", "--readapt", str(tmp_path / "round1"), "--train", str(corrected), str(masks[1]), "--slices",
                "axial:10,30", "--steps", "3", "--output", str(tmp_path / "round2"))
    assert again.returncode == 0, again.stderr
    before, after = (json.loads((tmp_path / r / "job.json").read_text()) for r in ("round1", "round2"))
    assert after["warm_start"] == "inputs/warm_start" and after["method"] == before["method"]
    assert after["model"] == before["model"] and after["audit"] == before["audit"] == []
    # the first round's case and the correction, named as that round named the volume it predicted
    assert [c["name"] for c in after["support"]] == ["first_t1", "corrected_t1"]
    assert after["support"][1]["annotated"] and after["train"] == {**before["train"], "steps": 3}
    assert [c["name"] for c in after["predict"]] == ["corrected_t1"]  # the first round's predictions, made again
    adapter = tmp_path / "round1" / "adapter" / "adapter.safetensors"
    assert (tmp_path / "round2" / "inputs" / "warm_start" / "adapter.safetensors").read_bytes() == adapter.read_bytes()
    assert "result: adapted state" in again.stdout or "the adapter it started from is kept" in again.stdout
    started = next(e for e in read_events(tmp_path / "round2")[0] if e["event"] == "started")
    assert started["warm_start"] and started["steps"] == 3

    # the job folder stands for its adapter, in predict as in the Slicer panel's adapter check
    predicted = run("predict", "--model", str(shared(MESHNET)), "--adapter", str(tmp_path / "round2"),
                    "--image", str(first), "--output", str(tmp_path / "seg.nii.gz"))
    assert predicted.returncode == 0 and (tmp_path / "seg.nii.gz").is_file(), predicted.stderr
    # a re-adapt's start is the earlier round's adapter: the source itself only when that adapter was
    kept = json.loads((tmp_path / "round2" / "adapter" / "adapter.json").read_text())["metadata"]
    assert ("the adapter is the source model itself" in predicted.stderr) == kept["source_kept"]
    # the panel keeps the adapter folder itself: its Save adapter copies that, never the job's inputs
    checked = SceneLogic(None, JobClient(tmp_path)).checkAdapter("model5_gw_ae", str(tmp_path / "round2"))
    assert checked == str(tmp_path / "round2" / "adapter")

    for option in (("--method", "lora"), ("--audit", str(first), str(masks[0]))):
        refused = run("adapt", "--readapt", str(tmp_path / "round1"), "--train", str(corrected), str(masks[1]),
                      *option, "--output", str(tmp_path / "round3"))
        assert_one_line_error(refused, f"--readapt continues the job in {tmp_path / 'round1'} with its model, "
                                       f"method and audit; drop {option[0]}")
    refused = run("adapt", "--resume", "--readapt", str(tmp_path / "round1"), "--output", str(tmp_path / "round2"))
    assert_one_line_error(refused, "drop --readapt")

    # the corrected volume is the earlier round's audit volume: refused, saying what a re-adapt can do instead (it
    # said "give another audit, or none", which --readapt does not take)
    audited = create_job(tmp_path / "audited", JobSpec(
        model=str(shared(MESHNET)), support=[CaseSpec([str(first)], str(masks[0]))],
        audit=[CaseSpec([str(corrected)], str(masks[1]))], method=make_method("bitfit")))
    shutil.copytree(tmp_path / "round1" / "adapter", audited / "adapter")  # as if it had run
    refused = run("adapt", "--readapt", str(audited), "--train", str(corrected), str(masks[1]), "--output",
                  str(tmp_path / "round3"))
    assert_one_line_error(refused, "this audit volume is the training volume", "a re-adapt keeps the audit of the "
                          "job it continues: correct another volume, or start a new job with another audit")
    assert not (tmp_path / "round3").exists()


def test_a_case_short_of_channels_is_refused_naming_the_channels_the_model_takes(two_channel_bundle, tmp_path):
    """The refusal said "needs 2": which two, and in which order, is what the user has to give next."""
    from two_channel_model import brats_file, whole_tumour

    from PEFTAdaptLib.models.registry import model_card

    flair = str(brats_file(4, "FLAIR"))
    result = run("adapt", "--model", str(two_channel_bundle), "--train", flair,
                 str(whole_tumour(4, tmp_path / "wt.nii.gz")), "--output", str(tmp_path / "job"))
    assert_one_line_error(result, f"{Path(flair).name}: 1 image channel(s) given; model "  # the path as resolved
                                  f"'{model_card(two_channel_bundle).id}' needs 2 (FLAIR, T1c)")
    assert not (tmp_path / "job").exists()


def test_models_says_how_many_image_channels_a_case_needs_and_which(two_channel_bundle, tmp_path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(two_channel_bundle, models / "brats")
    monkeypatch.setenv("PEFTADAPT_MODELS", str(models))
    listed = run("models").stdout
    assert "    modality MR; 2 (FLAIR, T1c) image channels per case; labels whole tumour;" in listed
    assert "    modality MR (T1w); labels brain;" in listed  # a single-channel model's line as before
