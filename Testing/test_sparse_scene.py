"""The correct-and-re-adapt loop on a real MRML scene (slicer-core) and the real worker: a prediction comes in with
its uncertainty overlay, "next slice to check" moves the slice views, the user corrects two slices, and the
re-adapt trains on exactly those slices."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import shared
from slicer_scene import load_segmentation, load_volume, new_scene

from PEFTAdaptLib.data.transforms import from_array, to_array  # noqa: E402
from PEFTAdaptLib.jobs import JobClient  # noqa: E402
from PEFTAdaptLib.mrml.logic import STARTED_FROM, UNCERTAINTY_ROLE, AdaptationRequest, SceneLogic  # noqa: E402
from PEFTAdaptLib.uncertainty import companion_paths  # noqa: E402
from PEFTAdaptLib.mrml.scene_io import (  # noqa: E402
    SceneError, import_prediction, labels_from_card, write_segmentation_as_labelmap,
)


def test_corrected_slices_are_what_a_readapt_trains_on(thin, tmp_path):
    scene = new_scene()
    logic = SceneLogic(scene, JobClient(tmp_path / "jobs"))
    card = logic.registerModelFolder(str(shared("meshnet/model5_gw_ae")))
    volume = load_volume(scene, thin / "thin.nii.gz", "T1")
    drawn = load_segmentation(scene, thin / "thin_label.nii.gz", volume, "drawn", "White Matter")
    run = logic.startAdaptation(AdaptationRequest(
        modelId=card["id"], trainingPairs=[(volume, drawn)], method="bitfit", steps=2, patchSize=32, device="cpu",
        auditEvery=1, targetVolumes=[volume]))
    assert run.wait(600).outcome == "finished", run.state.message

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # a view's nodes, as Slicer's layout makes them
    slice_node.SetLayoutName("Red")
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetLayoutName("Red")
    [segmentation] = run.importResults()
    [overlay] = run.uncertaintyNodes
    assert composite.GetForegroundVolumeID() == overlay.GetID()
    assert overlay.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert segmentation.GetAttribute(STARTED_FROM) == str(run.job.prediction_paths()[0])

    shown, axis, index, reason = run.nextSliceToCheck("coronal")
    ranking = json.loads(companion_paths(run.job.prediction_paths()[0])["slices"].read_text())
    first = ranking["planes"]["coronal"]["slices"][0]
    assert shown is volume and (index, reason) == (first["index"], first["reason"])
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    target = matrix.MultiplyPoint([*map(float, first["at"]), 1.0])[:3]
    assert np.allclose(slice_node.GetSliceToRAS().GetElement(0, 3), target[0], atol=1e-3)
    assert run.nextSliceToCheck("coronal").index == ranking["planes"]["coronal"]["slices"][1]["index"]

    labels = labels_from_card(card["labels"])
    with pytest.raises(SceneError, match="is the prediction as it was"):
        logic.startReadaptation(run, [(volume, segmentation)])
    exported = write_segmentation_as_labelmap(segmentation, volume, labels, tmp_path / "edit.nrrd")
    edited = to_array(sitk.ReadImage(str(exported)), np.uint8)
    edited[60:120, 10:30, 10] = 1  # the user paints white matter on two coronal slices
    edited[60:120, 10:30, 25] = 2
    sitk.WriteImage(from_array(edited, sitk.ReadImage(str(exported))), str(tmp_path / "edited.nrrd"))
    import_prediction(scene, tmp_path / "edited.nrrd", volume, labels, "edited", segmentation)
    logic.markSlicesChecked(segmentation, axis, [index])  # the coronal slice shown first was right as predicted

    second = logic.startReadaptation(run, [(volume, segmentation)])
    spec = json.loads((second.jobDir / "job.json").read_text())
    corrected = spec["support"][-1]
    mask = to_array(sitk.ReadImage(str(second.jobDir / corrected["annotated"])), np.uint8)
    checked = np.moveaxis(mask, axis, 0)  # a view: the marked slice cleared below is cleared in `mask` too
    assert checked[index].all() and mask[..., 10].all()
    checked[index] = 0
    assert np.flatnonzero(mask.any(axis=(0, 1))).tolist() == [10, 25]
    assert spec["support"][0].get("annotated") is None  # the first round's drawn label counts whole
    assert second.wait(600).outcome == "finished", second.state.message


def test_each_result_segmentation_keeps_one_uncertainty_overlay_across_runs(thin, tmp_path):
    """Found by a user-level check: every run added another '<volume> uncertainty' volume and colour table of the same
    name (the old ones stayed in the scene and in the volume selectors) while the segmentation itself was reused."""
    scene = new_scene()
    logic = SceneLogic(scene, JobClient(tmp_path / "jobs"))
    card = logic.registerModelFolder(str(shared("meshnet/model5_gw_ae")))
    volume = load_volume(scene, thin / "thin.nii.gz", "T1")

    def segment(into=None):
        run = logic.segment(card["id"], volume, device="cpu")
        assert run.wait(600).outcome == "finished", run.state.message
        [segmentation] = run.importResults(into)
        return segmentation, run.uncertaintyNodes[0]

    def counts():
        return [scene.GetNodesByClass(kind).GetNumberOfItems() for kind in ("vtkMRMLScalarVolumeNode",
                                                                            "vtkMRMLColorTableNode")]

    segmentation, overlay = segment()
    before = counts()
    assert segmentation.GetNodeReference(UNCERTAINTY_ROLE) is overlay
    assert overlay.GetName() == f"{segmentation.GetName()} uncertainty"
    again, overlay_again = segment(segmentation)
    assert (again, overlay_again) == (segmentation, overlay) and counts() == before
    assert overlay.GetDisplayNode().GetColorNode().GetName() == f"{overlay.GetName()} colours"
    other, other_overlay = segment()  # another result segmentation has its own overlay
    assert other is not segmentation and other_overlay is not overlay
