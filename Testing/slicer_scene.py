"""A real MRML scene from the `slicer-core` wheel (no Qt), set up as Slicer's application does for the modules the
PEFTAdapt Logic uses; the module folder is put on sys.path as Slicer does for scripted modules."""
from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "PEFTAdapt"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  (slicer-core)


def new_scene():
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    scene._peftadapt_keep = [colors]  # keep the logic alive as long as the scene
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
    from PEFTAdaptSlicer.scene_io import SegmentLabel, import_prediction

    return import_prediction(scene, path, reference, [SegmentLabel(0, "background", (0, 0, 0)),
                                                      SegmentLabel(1, segment_name, (0.9, 0.6, 0.5))], name)
