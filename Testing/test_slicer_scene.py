"""Slicer-side logic on real MRML nodes (slicer-core wheel): export/import with geometry, segment styling,
subject hierarchy placement, live tables from events, and the panel's run state."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import shared
from slicer_scene import load_segmentation, load_volume, new_scene

from PEFTAdaptLib.jobs import RunState  # noqa: E402
from PEFTAdaptLib.mrml.monitor import AdaptationMonitor  # noqa: E402
from PEFTAdaptLib.mrml.scene_io import (  # noqa: E402
    SceneError, SegmentLabel, import_prediction, write_segmentation_as_labelmap, write_volume,
)

CORD = [SegmentLabel(0, "background", (0, 0, 0)),
        SegmentLabel(1, "spinal cord", (1.0, 0.8, 0.2), "SCT^123037004^Anatomical Structure~SCT^2748008^Spinal cord")]


def physically_equal(path_a, path_b) -> bool:
    """Same voxel values at the same physical points (Slicer may store an equivalent, re-ordered voxel grid)."""
    a, b = sitk.ReadImage(str(path_a), sitk.sitkFloat32), sitk.ReadImage(str(path_b), sitk.sitkFloat32)
    resampled = sitk.Resample(a, b, sitk.Transform(), sitk.sitkNearestNeighbor, -12345.0)
    return np.array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(b))


def test_volume_export_keeps_geometry_and_values(tmp_path):
    scene = new_scene()
    source = shared("spine/t2/t2.nii.gz")  # rotated axes: a real geometry test
    volume = load_volume(scene, source)
    written = write_volume(volume, tmp_path / "t2.nrrd")
    assert physically_equal(written, source)


def test_prediction_import_names_colours_geometry_and_study(tmp_path):
    scene = new_scene()
    volume = load_volume(scene, shared("spine/t2/t2.nii.gz"))
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume), study)

    segmentation = import_prediction(scene, shared("spine/t2/t2_seg-manual.nii.gz"), volume, CORD, "cord result")
    segments = segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == 1
    segment = segments.GetNthSegment(0)
    assert segment.GetName() == "spinal cord"
    assert np.allclose(segment.GetColor(), (1.0, 0.8, 0.2))
    tag = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and "Spinal cord" in str(tag)
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    # the temporary label map and colour table are gone
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0

    # and the segmentation exports back onto the volume's grid with the card's label values
    exported = write_segmentation_as_labelmap(segmentation, volume, CORD, tmp_path / "label.nii.gz")
    assert physically_equal(exported, shared("spine/t2/t2_seg-manual.nii.gz"))


def test_segment_names_that_match_no_class_are_reported(tmp_path):
    scene = new_scene()
    volume = load_volume(scene, shared("spine/t2/t2.nii.gz"))
    segmentation = load_segmentation(scene, shared("spine/t2/t2_seg-manual.nii.gz"), volume, "two", "cord")
    segmentation.GetSegmentation().AddEmptySegment("", "oedema")
    refused = r"'two': segments \['cord', 'oedema'\] match no class .*; rename or remove them$"
    with pytest.raises(SceneError, match=refused):
        write_segmentation_as_labelmap(segmentation, volume, CORD, tmp_path / "x.nii.gz")


def test_a_segmentation_of_many_foreign_segments_is_named_in_short_with_the_way_through_a_label_map(tmp_path):
    """Found by a user-level check: a segmentation made from FreeSurfer's aseg (dozens of segments named by its
    table) was refused listing every segment, with 'rename or remove them' as the only way."""
    scene = new_scene()
    volume = load_volume(scene, shared("spine/t2/t2.nii.gz"))
    segmentation = load_segmentation(scene, shared("spine/t2/t2_seg-manual.nii.gz"), volume, "aseg", "spinal cord")
    for i in range(40):
        segmentation.GetSegmentation().AddEmptySegment("", f"Left-Structure-{i}")
    with pytest.raises(SceneError) as refused:
        write_segmentation_as_labelmap(segmentation, volume, CORD, tmp_path / "x.nii.gz")
    message = str(refused.value)
    assert message.startswith("segmentation 'aseg': segments ['Left-Structure-0', 'Left-Structure-1', ")
    assert ", … (40 segments)] match no class of the model (spinal cord); labels in another numbering" in message
    assert "the Slicer panel's Label map with the label map volume as the annotation" in message
    assert "Left-Structure-39" not in message and "\n" not in message


def test_monitor_turns_events_into_table_and_plot_rows():
    scene = new_scene()
    monitor = AdaptationMonitor(scene, "run1")
    for step, dice in [(0, 0.61), (10, 0.72), (20, 0.70)]:
        monitor.handle({"event": "audit", "step": step, "dice": dice})
    monitor.handle({"event": "step", "step": 1, "steps": 20, "loss": 0.9})
    monitor.handle({"event": "unit_audit", "unit": "down0::lora_r4", "site": "down0", "family": "lora", "rank": 4,
                    "cost": 1024, "utility": 1e-5, "delta_dice": 0.01, "state": "inactive"})
    monitor.handle({"event": "unit_state", "unit": "down0::lora_r4", "state": "active"})
    assert monitor.dice_values() == [(0, 0.61), (10, 0.72), (20, 0.70)]
    monitor.handle({"event": "audit", "step": 30, "dice": 0.75, "gain": 0.14, "gain_low": 0.1, "gain_high": 0.2})
    step, dice, low, high = monitor.dice_band()[-1]
    assert (step, dice) == (30, 0.75) and (low, high) == (pytest.approx(0.71), pytest.approx(0.81))
    assert monitor.dice_band()[0][1:] == (0.61, 0.61, 0.61)  # no gain, no band
    band = [monitor.scene.GetNodeByID(monitor.chart.GetNthPlotSeriesNodeID(i)).GetYColumnName() for i in (1, 2)]
    assert band == ["dice_low", "dice_high"]
    assert monitor.loss_table.GetTable().GetNumberOfRows() == 1
    units = monitor.units_table.GetTable()
    assert units.GetNumberOfRows() == 1
    assert units.GetValueByName(0, "state").ToString() == "active"
    assert units.GetValueByName(0, "family").ToString() == "lora"  # kept from the earlier event
    monitor.handle({"event": "allocation", "step": 20, "active_units": 1, "budget_used": 1024, "budget": 2000})
    timeline = monitor.timeline_table.GetTable()
    assert timeline.GetNumberOfRows() == 1 and timeline.GetValueByName(0, "budget_used").ToInt() == 1024
    layers = monitor.layers_table.GetTable()
    assert layers.GetNumberOfRows() == 1 and layers.GetValueByName(0, "layer").ToString() == "down0"
    assert layers.GetValueByName(0, "active_parameters").ToInt() == 1024
    series = scene.GetNodeByID(monitor.chart.GetNthPlotSeriesNodeID(0))
    assert series.GetTableNodeID() == monitor.dice_table.GetID() and series.GetYColumnName() == "dice"


def test_the_panels_unit_states_are_the_controllers_gate_on_states():
    """The panels spell SEA-PEFT's states of a unit whose gate is on (monitor.ON_STATES: the front-ends need no
    torch, which the controller's package imports); a state renamed or added there must be named here too."""
    from PEFTAdaptLib.mrml.monitor import ON_STATES
    from PEFTAdaptLib.seapeft.controller import UnitState

    gate_on = {UnitState(active=True, guard=guard, votes=votes).label for guard in (0, 1) for votes in (0, 1)}
    assert set(ON_STATES) == gate_on


def test_run_state_folds_events_for_the_panel():
    state = RunState()
    state.update({"event": "started", "steps": 50})
    state.update({"event": "audit", "step": 0, "dice": 0.8})
    state.update({"event": "step", "step": 10, "steps": 50, "loss": 0.4, "eta_s": 125})
    state.update({"event": "audit", "step": 10, "dice": 0.9})
    assert state.describe() == "Training, step 10/50, about 2 min 05 s left, loss 0.400"
    assert (state.first_dice, state.best_dice) == (0.8, 0.9)
    state.update({"event": "failed", "message": "out of memory: use a smaller patch or the CPU"})
    assert state.finished and state.describe().startswith("Failed: out of memory")
    assert not RunState().finished


def test_export_and_import_make_no_segmentations_module_logic(tmp_path, monkeypatch):
    """Issue 15, defect 13: a new vtkSlicerSegmentationsModuleLogic set on the main scene at every export/import
    registers node classes and scene observers again; the two conversions used are static methods."""
    import slicer

    scene = new_scene()  # Slicer makes the one logic at startup
    volume = load_volume(scene, shared("spine/t2/t2.nii.gz"))
    made = []

    class CountedLogic(slicer.vtkSlicerSegmentationsModuleLogic):
        def __init__(self):
            made.append(self)

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", CountedLogic)
    segmentation = import_prediction(scene, shared("spine/t2/t2_seg-manual.nii.gz"), volume, CORD, "cord")
    write_segmentation_as_labelmap(segmentation, volume, CORD, tmp_path / "label.nrrd")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1 and (tmp_path / "label.nrrd").is_file()
    assert made == []


def test_run_state_of_a_predict_job_counts_its_volumes_and_says_whether_it_succeeded():
    state = RunState()
    state.update({"event": "started", "task": "predict", "steps": 2})
    state.update({"event": "prediction", "path": "predictions/a_seg.nii.gz", "index": 0})
    assert (state.step, state.steps, state.succeeded) == (1, 2, False)
    state.update({"event": "prediction", "path": "predictions/b_seg.nii.gz", "index": 1})
    state.update({"event": "finished", "exit_code": 0})
    assert (state.step, state.succeeded) == (2, True)
    cancelled = RunState()
    cancelled.update({"event": "cancelled", "reason": "stopped by the user"})
    assert cancelled.finished and not cancelled.succeeded


def test_a_segment_gets_its_classs_value_whatever_the_case_of_its_name_or_the_name_of_a_single_segment(tmp_path):
    """Found by a user-level check: a segment named 'Segment_1' (the Segment Editor's default) for a one-class model,
    or 'white matter' for a model whose class is 'White Matter', was exported with a value past the model's classes
    ([0, 2], [0, 3]): Slicer looked the segment's own name up in a colour table keyed by the class names, and the job
    was refused with 'label values [3] are not classes of this model'."""
    scene = new_scene()
    volume = load_volume(scene, shared("spine/t2/t2.nii.gz"))
    label = shared("spine/t2/t2_seg-manual.nii.gz")
    matter = [SegmentLabel(0, "background", (0, 0, 0)), SegmentLabel(1, "White Matter", (1, 1, 1)),
              SegmentLabel(2, "Grey Matter", (0.5, 0.5, 0.5))]
    for labels, name, value in ((CORD, "Segment_1", 1), (CORD, "SPINAL CORD", 1), (matter, "white matter", 1),
                                (matter, "grey MATTER", 2)):
        segmentation = load_segmentation(scene, label, volume, name, name)
        written = write_segmentation_as_labelmap(segmentation, volume, labels, tmp_path / f"{name}.nrrd")
        assert np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(written)))).tolist() == [0, value], name
    both = load_segmentation(scene, label, volume, "both", "White Matter")
    both.GetSegmentation().AddEmptySegment("", "white matter")
    with pytest.raises(SceneError, match=r"'both': segments \['White Matter', 'white matter'\] are the same class"):
        write_segmentation_as_labelmap(both, volume, matter, tmp_path / "both.nrrd")


def test_the_kept_state_is_its_own_series_and_the_end_of_a_run_reads_as_the_command_line_reports_it(capsys):
    """Found by a user-level check: the kept state's validation Dice was drawn as one more, unlabelled point of the
    audit series, and the panel's Dice line named the best audit even when that state was not kept; the command
    line's report (start, kept, gain with its lower bound, Dice per class) is now the RunState's text for both."""
    import types
    from pathlib import Path

    from PEFTAdaptLib import cli

    scene = new_scene()
    monitor, state = AdaptationMonitor(scene, "run"), RunState()
    events = [{"event": "audit", "step": 0, "dice": 0.91},
              {"event": "audit", "step": 20, "dice": 0.95, "gain": 0.04, "gain_low": -0.01, "gain_high": 0.09},
              {"event": "validation", "step": 20, "dice": 0.93, "gain": 0.02, "gain_low": 0.005, "kept": "adapted",
               "classes": {"White Matter": 0.95, "Grey Matter": 0.91}},
              {"event": "finished", "exit_code": 0}]
    for event in events:
        monitor.handle(event)
        state.update(event)
    assert monitor.dice_values() == [(0, 0.91), (20, 0.95)]
    series = {scene.GetNodeByID(monitor.chart.GetNthPlotSeriesNodeID(i)).GetName(): i
              for i in range(monitor.chart.GetNumberOfPlotSeriesNodes())}
    kept = scene.GetNodeByID(monitor.chart.GetNthPlotSeriesNodeID(series["kept state"]))
    assert kept.GetTableNodeID() == monitor.kept_table.GetID()
    assert monitor.kept_table.GetTable().GetValue(0, 1).ToDouble() == 0.93
    assert state.dice_text == "audit Dice: start 0.9100, kept 0.9300 — audit Dice +2.0 points (95 % lower bound +0.5)"
    assert state.class_text == "audit Dice per class: White Matter 0.9500, Grey Matter 0.9100"
    cli.report(types.SimpleNamespace(state=state, adapter_folder=Path("/nonexistent"),
                                     prediction_paths=lambda: [], folder=None))
    assert capsys.readouterr().out.splitlines()[:2] == [state.dice_text, state.class_text]


def test_a_label_map_volume_converted_again_after_its_map_file_changed_follows_the_new_map(tmp_path):
    """Adding a label map volume again with the same map file reused its segmentation even when the file had been
    edited since: the old mapping stayed, silently. The file's content now counts, not only its path."""
    import json

    from PEFTAdaptLib.jobs import JobClient
    from PEFTAdaptLib.mrml.logic import SceneLogic
    from PEFTAdaptLib.mrml.scene_io import labels_from_card, read_labelmap

    scene = new_scene()
    logic = SceneLogic(scene, JobClient(tmp_path / "jobs"))
    volume = load_volume(scene, shared("brats/brats_2013_pat0003_1/T1c_subtrMeanDivStd.nii.gz"), "T1c 3")
    mask = sitk.ReadImage(str(shared("brats/brats_2013_pat0003_1/brainmask.nii.gz")))
    halves = sitk.GetArrayFromImage(mask).astype(np.uint8) * 7
    halves[:, :, halves.shape[2] // 2:] *= 2  # 7 on one side of the brain, 14 on the other
    labels = sitk.GetImageFromArray(halves)
    labels.CopyInformation(mask)
    sitk.WriteImage(labels, str(tmp_path / "halves.nii.gz"))
    labelmap = read_labelmap(scene, tmp_path / "halves.nii.gz", "halves")
    mapping = tmp_path / "map.json"

    def converted(value: int):
        mapping.write_text(json.dumps({"brain": [value]}))
        node = logic.segmentationFromLabelmap(labelmap, volume, "deepbet-brain", mapping)
        exported = write_segmentation_as_labelmap(node, volume, labels_from_card(logic.card("deepbet-brain")["labels"]),
                                                  tmp_path / f"brain{value}.nrrd")
        return node, sitk.GetArrayFromImage(sitk.ReadImage(str(exported))) > 0

    first, left = converted(7)
    again, same = converted(7)
    assert again is first and np.array_equal(same, left)
    moved, right = converted(14)
    assert moved is not first
    assert right.any() and not (right & left).any()
