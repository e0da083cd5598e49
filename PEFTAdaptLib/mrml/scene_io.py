"""MRML nodes ⇄ files: volumes and segmentations out to a job folder, predictions back in as segmentation nodes."""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import slicer
import vtk

from ..data.io import read_image
from ..data.mgh import is_mgh
from ..errors import InputError


class SceneError(Exception):
    """A problem with the user's nodes, phrased for the panel (names the node)."""


@dataclass
class SegmentLabel:
    """How a model's class appears in Slicer."""

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str = ""


def remove_node(scene, node) -> None:
    """Remove a temporary node with the display and storage nodes it brought along."""
    if node is None:
        return
    dependents = []
    for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
        if hasattr(node, getter):
            kind = "Display" if "Display" in getter else "Storage"
            dependents += [getattr(node, f"GetNth{kind}Node")(i) for i in range(getattr(node, getter)())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and scene.IsNodePresent(dependent):
            scene.RemoveNode(dependent)


#: the segmentation conversions used here are static methods: no logic instance is made or attached to the scene
SEGMENTATIONS = slicer.vtkSlicerSegmentationsModuleLogic


def write_volume(volume_node, path: Path) -> Path:
    """Write a scalar or label volume with its full geometry (IJK→RAS) through Slicer's own storage node."""
    if volume_node.GetImageData() is None:
        raise SceneError(f"volume '{volume_node.GetName()}' has no image data")
    return _write(volume_node, path, slicer.vtkMRMLVolumeArchetypeStorageNode(), "volume")


def write_segmentation(segmentation_node, path: Path) -> Path:
    """Write Slicer's own `.seg.nrrd`: every segment with its name, colour and terminology, on the reference grid."""
    return _write(segmentation_node, path, slicer.vtkMRMLSegmentationStorageNode(), "segmentation")


def _write(node, path: Path, storage, what: str) -> Path:
    scene = node.GetScene()
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise SceneError(f"could not write {what} '{node.GetName()}' to {path}")
    finally:
        scene.RemoveNode(storage)
    return path


def read_labelmap(scene, path: Path, name: str):
    return _read_volume_node(scene, path, name, "vtkMRMLLabelMapVolumeNode", "the prediction")


def read_volume(scene, path: Path, name: str, node=None):
    """Load a scalar volume with its file's geometry and a default (greyscale, auto window/level) display; `node`
    (an earlier load of the same kind of file) is read into again instead of adding a node."""
    node = _read_volume_node(scene, path, name, "vtkMRMLScalarVolumeNode", "volume", node)
    node.CreateDefaultDisplayNodes()
    return node


def _read_volume_node(scene, path: Path, name: str, class_name: str, what: str, node=None):
    new = node is None
    if new:
        node = scene.AddNewNodeByClass(class_name, name)
    if not (_read_as_the_engine_does(scene, node, path) if is_mgh(path) else _read_into(scene, node, path)):
        if new:
            remove_node(scene, node)
        raise SceneError(f"could not read {what} {path}")
    return node


def _read_into(scene, node, path: Path) -> bool:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        return bool(storage.ReadData(node))
    finally:
        scene.RemoveNode(storage)


def _read_as_the_engine_does(scene, node, path: Path) -> bool:
    """FreeSurfer's MGH/MGZ, which MRML without Slicer's own readers (slicer-core) cannot read: read as the engine
    reads it (nibabel, `data/mgh.py`), so the node shows the voxels and geometry a job trains on, through a
    transient NRRD file."""
    try:
        image = read_image(path)
    except InputError:
        return False
    with tempfile.TemporaryDirectory(prefix="peftadapt-") as folder:
        converted = Path(folder) / "volume.nrrd"
        sitk.WriteImage(image, str(converted))
        return _read_into(scene, node, converted)


#: unmatched segments named in full; more are a label map in another numbering made a segmentation
MANY_UNMATCHED = 4


def write_segmentation_as_labelmap(
    segmentation_node, reference_volume, labels: Sequence[SegmentLabel], path: Path
) -> Path:
    """Export the segments whose names match the model's classes onto the reference volume's grid.

    Segments are matched to classes by name (case-insensitive); with a single foreground class and a single segment,
    that segment is taken whatever its name. Unmatched segments are reported, not silently dropped.
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    segments = {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i).GetName()
                for i in range(segmentation.GetNumberOfSegments())}
    if not segments:
        raise SceneError(f"segmentation '{segmentation_node.GetName()}' has no segment to train on")
    foreground = [label for label in labels if label.value != 0]
    by_name = {label.name.lower(): label for label in foreground}
    assignment: dict[str, SegmentLabel] = {}
    for segment_id, name in segments.items():
        if name.lower() in by_name:
            assignment[segment_id] = by_name[name.lower()]
    if not assignment and len(foreground) == 1 and len(segments) == 1:
        assignment = {next(iter(segments)): foreground[0]}
    unmatched = sorted(set(segments.values()) - {segments[s] for s in assignment})
    if unmatched:
        many = len(unmatched) > MANY_UNMATCHED  # a label map in another numbering made a segmentation (aseg…)
        shown = ", ".join(map(repr, unmatched[:MANY_UNMATCHED]))
        shown += f", … ({len(unmatched)} segments)" if many else ""
        hint = ("; labels in another numbering (FreeSurfer's aseg…) come in through a label map instead: the Slicer "
                "panel's Label map with the label map volume as the annotation, the browser app's with the label "
                "file" if many else "; rename or remove them")
        raise SceneError(f"segmentation '{segmentation_node.GetName()}': segments [{shown}] match no class of the "
                         f"model ({', '.join(l.name for l in foreground)}){hint}")
    # Slicer looks a segment's value up by its own name in the export colour table (GetLabelValuesFromColorNode): the
    # table holds each matched segment's name at its class's value, so 'Segment_1' or 'white matter' gets the value
    by_value: dict[int, set[str]] = {}
    for segment_id, label in assignment.items():
        by_value.setdefault(label.value, set()).add(segments[segment_id])
    clash = next((names for names in by_value.values() if len(names) > 1), None)
    if clash:
        raise SceneError(f"segmentation '{segmentation_node.GetName()}': segments {sorted(clash)} are the same class; "
                         "merge them into one segment")
    entries = [SegmentLabel(label.value, segments[segment_id], label.color) for segment_id, label in assignment.items()]
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segmentation_node.GetName()}_export")
    color_table = _color_table(scene, entries, f"{segmentation_node.GetName()}_colors")
    try:
        ids = vtk.vtkStringArray()
        for segment_id in assignment:
            ids.InsertNextValue(segment_id)
        if not SEGMENTATIONS.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume,
                                                  slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, color_table):
            raise SceneError(f"could not export segmentation '{segmentation_node.GetName()}'")
        return write_volume(labelmap, path)
    finally:
        remove_node(scene, labelmap)
        remove_node(scene, color_table)
        # the export logic may add a `<segmentation>_ColorTable` for the temporary label map: leave no trace
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if node.GetID() not in before and node.IsA("vtkMRMLColorTableNode"):
                scene.RemoveNode(node)


def _color_table(scene, labels: Sequence[SegmentLabel], name: str):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(max(l.value for l in labels) + 1)
    for label in labels:
        table.SetColor(label.value, label.name, *label.color, 1.0)
    return table


def import_prediction(
    scene, label_path: Path, reference_volume, labels: Sequence[SegmentLabel], name: str, segmentation_node=None
):
    """Load a predicted label map as a segmentation node: the model's segment names, colours and terminology, the
    reference geometry of `reference_volume`, placed under the volume's study in the subject hierarchy and under
    its parent transform (the file holds the volume's local grid, as `write_volume` wrote it)."""
    labelmap = read_labelmap(scene, label_path, f"{name}_labelmap")
    color_table = _color_table(scene, labels, f"{name}_colors")
    try:
        labelmap.GetDisplayNode() or labelmap.CreateDefaultDisplayNodes()
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentation_node.CreateDefaultDisplayNodes()
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        # label map and segmentation share the volume's transform: imported voxel for voxel, shown where the volume is
        labelmap.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        segmentation_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_volume.GetID()
        )
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
        if not SEGMENTATIONS.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ""):
            raise SceneError(f"could not import the prediction {label_path}")
        _style_segments(segmentation_node, labels)
        _place_under_study(scene, segmentation_node, reference_volume)
        return segmentation_node
    finally:
        remove_node(scene, labelmap)
        remove_node(scene, color_table)


def _style_segments(segmentation_node, labels: Sequence[SegmentLabel]) -> None:
    segmentation = segmentation_node.GetSegmentation()
    by_name = {label.name: label for label in labels}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        label = by_name.get(segment.GetName())
        if label is None:
            continue
        segment.SetColor(*label.color)
        if label.terminology:
            segment.SetTag(segment.GetTerminologyEntryTagName(), label.terminology)


def _place_under_study(scene, node, volume) -> None:
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = hierarchy.GetItemByDataNode(volume)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else 0
    if not parent or parent == hierarchy.GetSceneItemID():
        return
    node_item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemParent(node_item, parent)


def labels_from_card(card_labels: Sequence[dict]) -> list[SegmentLabel]:
    """Model-card label dicts (value, name, color, terminology) → SegmentLabel list."""
    return [SegmentLabel(int(l["value"]), l["name"], tuple(l.get("color", (1, 0, 0))), l.get("terminology", ""))
            for l in card_labels]


#: the uncertainty overlay: values below this are transparent, the rest coloured from yellow (low) to red (high)
OVERLAY_THRESHOLD, OVERLAY_OPACITY = 0.1, 0.5


def import_overlay(scene, path: Path, name: str, reference_volume, node=None):
    """Load a [0, 1] map (an uncertainty map) of `reference_volume` as a colour overlay under the volume's transform:
    the foreground layer of every slice view, its lowest values transparent. `node` (the overlay of an earlier run)
    is read into again, with its colour table, so that runs do not pile up overlays of the same name."""
    node = read_volume(scene, path, name, node)
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    display = node.GetDisplayNode()
    colors = display.GetColorNode()
    if colors is None or colors.GetName() != f"{name} colours":
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
        colors.SetTypeToWarm1()
    display.SetAndObserveColorNodeID(colors.GetID())
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetThreshold(OVERLAY_THRESHOLD, 1.0)
    display.SetApplyThreshold(1)
    for composite in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetForegroundVolumeID(node.GetID())
        composite.SetForegroundOpacity(OVERLAY_OPACITY)
    return node


def show_voxel(scene, volume, ijk) -> list[float]:
    """Move every slice view to the voxel `ijk` of `volume` (centred on it); returns its world (RAS) position:
    IJK→RAS gives the volume's local position, its parent transform (a registration) moves it to world."""
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    local = matrix.MultiplyPoint([float(i) for i in ijk] + [1.0])[:3]
    world = [0.0, 0.0, 0.0]
    volume.TransformPointToWorld(local, world)
    for slice_node in nodes_of_class(scene, "vtkMRMLSliceNode"):
        slice_node.JumpSliceByCentering(*world)
    return list(world)


def nodes_of_class(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
