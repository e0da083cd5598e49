"""2D images and single slices end to end: a real 2D model (a MONAI bundle trained on real BraTS FLAIR slices),
real slices of other patients' T1c as PNG, TIFF and single-slice volumes, adaptation and prediction by the real
worker subprocess through the job client; predictions on each input's own geometry."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from planar_model import as_png, as_single_slice, brats_slice, train_bundle
from test_cli import assert_one_line_error, run
from PEFTAdaptLib.data.cases import read_case_files
from PEFTAdaptLib.data.io import same_geometry
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec
from PEFTAdaptLib.jobs.events import read_events
from PEFTAdaptLib.jobs.spec import load_job
from PEFTAdaptLib.methods import make_method
from PEFTAdaptLib.metrics import hd95
from PEFTAdaptLib.models.registry import model_card
from PEFTAdaptLib.uncertainty import companion_paths


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_bundle(tmp_path_factory.mktemp("bundle") / "brats-2d")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for patient in (3, 4, 6):  # a folder each: Slicer's reader takes numbered names in one folder as a series
        folder = tmp_path_factory.mktemp(f"patient{patient}")
        image, label = brats_slice(patient, "T1c")
        out[patient] = {"png": as_png(image, folder / f"p{patient}.png"),
                        "tif": folder / f"p{patient}.tif", "label_png": folder / f"p{patient}_label.png",
                        "slice": as_single_slice(image, folder / f"p{patient}_slice.nii.gz"),
                        "label_slice": as_single_slice(label, folder / f"p{patient}_slice_label.nii.gz")}
        sitk.WriteImage(image, str(out[patient]["tif"]))
        out[patient]["dcm"] = folder / f"p{patient}.dcm"  # a DICOM file, as a CR/DX radiograph comes
        sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image, 0, 4000), sitk.sitkInt16), str(out[patient]["dcm"]))
        sitk.WriteImage(label, str(out[patient]["label_png"]))
    return out


def test_a_2d_image_adapts_and_predicts_on_its_own_geometry(model, files, tmp_path):
    client = JobClient(tmp_path)
    predict = [CaseSpec([str(files[6][kind])]) for kind in ("png", "slice", "tif", "dcm")]
    job = client.submit(JobSpec(
        model=str(model), support=[CaseSpec([str(files[3]["png"])], str(files[3]["label_png"]))],
        audit=[CaseSpec([str(files[4]["slice"])], str(files[4]["label_slice"]))], predict=predict,
        method=make_method("lora", rank=2),
        train=TrainSpec(steps=6, lr=3e-3, patches_per_step=2, audit_every=3, seed=1, device="cpu")))
    state = job.wait(timeout=300)
    assert state.outcome == "finished", state.message
    started = next(e for e in job.events if e["event"] == "started")
    assert started["trainable"] > 0
    paths = job.prediction_paths()
    assert [p.suffix for p in paths] == [".png", ".gz", ".tif", ".nrrd"]  # a label map is no DICOM image
    for case, path in zip(predict, paths):
        written, original = sitk.ReadImage(str(path)), sitk.ReadImage(case.images[0])
        assert written.GetDimension() == original.GetDimension()
        assert same_geometry(written, original)  # the single slice keeps its origin, 0.9 mm spacing and 3 mm depth
        assert set(np.unique(sitk.GetArrayViewFromImage(written))) <= {0, 1}
        uncertainty = sitk.ReadImage(str(companion_paths(path)["uncertainty"]))  # a float map: PNG's as NRRD
        assert same_geometry(uncertainty, written) and uncertainty.GetPixelID() == sitk.sitkFloat32
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))).squeeze() for p in paths]
    # a predict job with the adapter reproduces the single slice's prediction
    again = client.submit(JobSpec(model=str(model), task="predict", predict=predict[1:2],
                                  adapter=str(job.adapter_folder), train=TrainSpec(device="cpu")))
    assert again.wait(timeout=300).outcome == "finished", again.state.message
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(again.prediction_paths()[0]))).squeeze() == arrays[1]).all()


def test_a_volume_for_a_2d_model_and_a_slice_for_a_3d_model_are_refused_by_name(model, files):
    card = model_card(str(model))
    volume = shared("brats/brats_2013_pat0003_1/T1c_subtrMeanDivStd.nii.gz")
    with pytest.raises(InputError, match=r"T1c_subtrMeanDivStd.nii.gz: image is a volume .* is 2D"):
        read_case_files([volume], card)
    with pytest.raises(InputError, match=r"p3.png: image has size \(240, 240\); model 'deepbet-brain' is 3D"):
        read_case_files([files[3]["png"]], model_card("deepbet-brain"))
    with pytest.raises(InputError, match=r"train.patch_size: \[32, 32, 32\] has 3 entries; model .* is 2D"):
        JobClient(files[3]["png"].parent).create(JobSpec(
            model=str(model), support=[CaseSpec([str(files[3]["png"])], str(files[3]["label_png"]))],
            method=make_method("lora", rank=2), train=TrainSpec(patch_size=[32, 32, 32])))


def test_hd95_of_a_single_slice_is_measured_in_its_plane():
    disc = np.zeros((40, 40), bool)
    disc[10:30, 10:30] = True
    shifted = np.roll(disc, 3, axis=0)
    planar = hd95(shifted, disc, (1.0, 1.0))
    assert planar == pytest.approx(3.0)
    assert hd95(shifted[:, :, None], disc[:, :, None], (1.0, 1.0, 5.0)) == pytest.approx(planar)


def test_a_single_slice_adapts_in_the_slicer_scene_and_imports_a_segmentation(model, files, tmp_path):
    """Slicer holds a radiograph or a slice as a single-slice volume: the scene logic exports it, the 2D model adapts
    on it, and the target's segmentation comes back on the target's geometry."""
    from slicer_scene import load_segmentation, load_volume, new_scene

    from PEFTAdaptLib.mrml.logic import AdaptationRequest, SceneLogic

    logic = SceneLogic(new_scene(), JobClient(tmp_path / "jobs"))
    card = logic.registerModelFolder(str(model))
    assert card["spatial_dims"] == 2

    def pair(patient):
        volume = load_volume(logic.scene, files[patient]["slice"], f"T1c {patient}")
        return volume, load_segmentation(logic.scene, files[patient]["label_slice"], volume, f"tumour {patient}",
                                         "whole tumour")

    target = load_volume(logic.scene, files[6]["slice"], "T1c 6")
    run = logic.startAdaptation(AdaptationRequest(
        modelId=card["id"], trainingPairs=[pair(3)], auditPairs=[pair(4)], targetVolumes=[target], method="lora",
        rank=2, steps=4, patchSize=32, device="cpu", seed=1, auditEvery=2, learningRate=3e-3))
    assert run.wait(300).outcome == "finished", run.state.message
    [segmentation] = run.importResults()
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "whole tumour"
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is target
    [prediction] = run.job.prediction_paths()
    written = sitk.ReadImage(str(prediction))
    assert written.GetSize() == (240, 240, 1) and same_geometry(written, sitk.ReadImage(str(files[6]["slice"])))


def test_a_model_folder_given_relative_to_the_current_folder_is_found(model, files, tmp_path):
    """Found by a user-level check: the worker runs in the job folder, where `--model rel/brats-2d` was unknown."""
    shutil.copytree(model, tmp_path / "rel" / "brats-2d")
    predicted = run("predict", "--model", "rel/brats-2d", "--image", str(files[6]["png"]), "--output", "seg.png",
                    "--device", "cpu", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "seg.png").is_file()
    adapted = run("adapt", "--model", "rel/brats-2d", "--train", str(files[3]["png"]), str(files[3]["label_png"]),
                  "--method", "lora", "--rank", "2", "--steps", "2", "--audit-every", "1", "--device", "cpu",
                  "--output", "job", cwd=tmp_path)
    assert adapted.returncode == 0, adapted.stderr
    assert json.loads((tmp_path / "job" / "job.json").read_text())["model"] == str(tmp_path / "rel" / "brats-2d")


def adapt_2d(model, files, output, *options: str) -> subprocess.CompletedProcess:
    """`peftadapt adapt` of the 2D model on patient 3's PNG slice (2 steps of LoRA r2), with `options` after it."""
    return run("adapt", "--model", str(model), "--train", str(files[3]["png"]), str(files[3]["label_png"]), *options,
               "--method", "lora", "--rank", "2", "--steps", "2", "--audit-every", "1", "--device", "cpu",
               "--output", str(output))


def tumour_rows(label_path) -> list[int]:
    """Four adjacent rows (index axis 1) through the middle of the tumour of a 2D label file."""
    rows = np.flatnonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).any(axis=1))
    middle = int(np.median(rows))
    return list(range(middle - 1, middle + 3))


def test_slices_of_a_2d_image_are_rows_or_columns_and_a_plane_name_is_one_line(model, files, tmp_path):
    """Found by a user-level check: `--slices` on a 2D image was an internal error (a reshape to 3×3, a transpose of
    three axes, a third axis)."""
    audit = ("--audit", str(files[4]["png"]), str(files[4]["label_png"]))
    for spec in ("axial:0", "2:0"):
        assert_one_line_error(adapt_2d(model, files, tmp_path / "refused", "--slices", spec, *audit),
                              f"--slices: '{spec.split(':')[0]}' is no slice axis of a 2D image", "index axis 0")
    assert not (tmp_path / "refused").exists()
    rows = ",".join(map(str, tumour_rows(files[3]["label_png"])))
    result = adapt_2d(model, files, tmp_path / "rows", "--slices", f"1:{rows}", *audit)
    assert result.returncode == 0, result.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "rows" / "inputs" / "support0_annotated.nii.gz")))
    assert mask.shape == (240, 240) and set(np.flatnonzero(mask.any(axis=1))) == set(map(int, rows.split(",")))


def test_a_partly_annotated_2d_image_without_an_audit_holds_out_a_band_of_its_rows(model, files, tmp_path):
    """Found by a user-level check: every 2D mask was refused ("no annotated voxel holds a structure"), the hold-out
    reading a 2D label as a volume."""
    image = sitk.ReadImage(str(files[3]["png"]))
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    array[5:, 5:] = 1  # every tumour pixel, not the image's first rows and columns
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(tmp_path / "annotated.png"))
    result = adapt_2d(model, files, tmp_path / "job", "--annotated", str(tmp_path / "annotated.png"))
    assert result.returncode == 0, result.stderr
    started = next(e for e in read_events(tmp_path / "job")[0] if e["event"] == "started")
    [held] = started["audit_held_out"]  # a band of the image's rows or columns, named on the image's grid
    band, length = held["slices"], image.GetSize()[held["axis"]]
    assert 0 < len(band) and band[-1] - band[0] < length / 2  # one band (on the 2 mm grid: every other pixel line)


def test_a_2d_models_patch_size_is_n_or_x_y(model, files, tmp_path):
    """Found by a user-level check: `--patch-size 48` became [48, 48, 48] ("has 3 entries; model is 2D") and 48,48
    was not understood, so no patch could be set for a 2D model."""
    for given, patch in (("48", [48, 48]), ("48,32", [48, 32])):
        result = adapt_2d(model, files, tmp_path / given, "--patch-size", given)
        assert result.returncode == 0, result.stderr
        assert model_card(str(model)).training_patch(load_job(tmp_path / given).train.patch_size) == tuple(patch)
    assert "N, X,Y or X,Y,Z" in run("adapt", "--patch-size", "1,2,3,4", "--output", str(tmp_path)).stderr


def test_predict_refuses_a_dicom_output_before_any_work(model, files, tmp_path):
    """Found by a user-level check: `--output seg.dcm` wrote the label as a DICOM image and a 0-byte uncertainty file,
    then failed in a multi-line ITK message ending "check the folder exists and is writable"."""
    output = tmp_path / "seg.dcm"
    assert_one_line_error(run("predict", "--model", str(model), "--image", str(files[6]["dcm"]), "--output",
                              str(output), "--device", "cpu"),
                          f"--output {output}: a label map cannot be written as .dcm", ".nrrd or .nii.gz")
    assert not list(tmp_path.iterdir())
    # an unknown suffix lists what a label map is written as: not .dcm, which would then be refused (found verifying)
    result = run("predict", "--model", str(model), "--image", str(files[6]["dcm"]), "--output",
                 str(tmp_path / "seg.dicom"))
    assert_one_line_error(result, "seg.dicom: unsupported file type; use one of .nii.gz")
    assert ".dcm" not in result.stderr


def test_a_single_slice_volume_has_no_slices_to_rank_as_a_2d_image_has_none(model, files, tmp_path):
    """Found by a user-level check: a single-slice volume's ranking listed 1-pixel lines as sagittal and coronal
    slices (and its one slice as axial); the same slice as a 2D image had none."""
    for kind in ("slice", "png"):
        output = tmp_path / f"{kind}_seg.nii.gz"
        result = run("predict", "--model", str(model), "--image", str(files[6][kind]), "--output", str(output),
                     "--device", "cpu")
        assert result.returncode == 0, result.stderr
        assert json.loads(companion_paths(output)["slices"].read_text()) == {"planes": {}}


def test_a_grey_image_saved_as_rgb_is_read_as_grey_and_true_colour_is_one_line(model, files, tmp_path):
    """Found by a user-level check: a grey slice exported as an RGB PNG (three equal channels, as radiographs and
    screenshots often are) was refused as "3 components per voxel; a single-channel volume is required"."""
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(files[6]["png"])))
    rgb = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True), str(rgb))
    outputs = {}
    for name, image in (("rgb", rgb), ("grey", files[6]["png"])):
        outputs[name] = tmp_path / f"{name}_seg.png"
        result = run("predict", "--model", str(model), "--image", str(image), "--output", str(outputs[name]),
                     "--device", "cpu")
        assert result.returncode == 0, result.stderr
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["rgb"])))
            == sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["grey"])))).all()
    colour = np.stack([grey, grey, np.flipud(grey)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "colour.png"))
    assert_one_line_error(run("predict", "--model", str(model), "--image", str(tmp_path / "colour.png"), "--output",
                              str(tmp_path / "colour_seg.png")),
                          "colour.png: image has 3 channels per voxel (colour)", "save it as greyscale")
