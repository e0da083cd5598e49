"""A real MRML scene from the `slicer-core` wheel (no Qt), set up as Slicer's application does for the modules the
PEFTAdapt Logic uses."""
from __future__ import annotations

from pathlib import Path

import slicer  # slicer-core


def new_scene():
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()  # Slicer makes it at startup: it registers the
    segmentations.SetMRMLScene(scene)  # segmentation representation converters
    scene._peftadapt_keep = [colors, segmentations]  # keep the logics alive as long as the scene
    return scene


def load_volume(scene, path: Path, name: str | None = None):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    hierarchy = scene.GetSubjectHierarchyNode()  # Slicer's Qt plugins do this for every new data node
    hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return node


def load_segmentation(scene, path: Path, reference, name: str, segment_name: str):
    """A segmentation node made from a label file, as a user would have after drawing (one named segment)."""
    from PEFTAdaptLib.mrml.scene_io import SegmentLabel, import_prediction

    return import_prediction(scene, path, reference, [SegmentLabel(0, "background", (0, 0, 0)),
                                                      SegmentLabel(1, segment_name, (0.9, 0.6, 0.5))], name)
