"""Sparse supervision: a label whose voxels count only where the user annotated (the slices a clinician corrected).

The annotated voxels are a binary mask on the image's grid, stored beside the label (`--annotated MASK`, or made
from a slice list `--slices axial:12,40,77`; the Slicer and browser panels make it from the slices a correction
touched). On the model's grid the mask is carried inside the label array: voxels outside it hold `UNANNOTATED`, a
value no class uses. Patch crops, augmentation (nearest neighbour) and hold-out cuts move that value with the
label, so every consumer sees the same annotated voxels; the loss, the patch centres and the audit count only
those (docs/sparse.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .io import read_image, same_geometry, write_image

#: the label value, on the model's grid, of voxels nobody annotated (never a class index: cards hold < 255 classes)
UNANNOTATED = 255
#: anatomical slice names → the patient axis (LPS, as ITK's direction cosines) their normal follows
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}


def annotated(label: np.ndarray) -> np.ndarray:
    """Boolean mask of the voxels whose label counts."""
    return label != UNANNOTATED


def is_sparse(label: np.ndarray) -> bool:
    return bool((label == UNANNOTATED).any())


def foreground(label: np.ndarray) -> np.ndarray:
    """Annotated voxels of any structure (class index > 0)."""
    return (label > 0) & annotated(label)


def read_annotated(path, image: sitk.Image, image_path) -> sitk.Image:
    """Read an annotated-voxel mask and check it lies on the image's grid, is binary and not empty."""
    mask = read_image(path, what="annotated-voxel mask")
    if not same_geometry(mask, image):
        raise InputError(f"{path}: annotated-voxel mask geometry (size/spacing/origin/direction) differs from image "
                         f"{image_path}; draw it on the image's grid")
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if not set(values.tolist()) <= {0, 1}:
        raise InputError(f"{path}: annotated-voxel mask holds values other than 0 and 1")
    if not values.any():
        raise InputError(f"{path}: annotated-voxel mask is empty; mark at least one annotated slice")
    return sitk.Cast(mask, sitk.sitkUInt8)


def index_axis(image: sitk.Image, plane: str, where: str = "--slices") -> int:
    """The image's index axis that walks across slices of an anatomical `plane` (or an index axis given as 0/1/2).
    A 2D image has rows and columns, not anatomical planes: index axis 0 or 1 only."""
    if plane in [str(axis) for axis in range(image.GetDimension())]:
        return int(plane)
    if image.GetDimension() == 2:
        raise InputError(f"{where}: '{plane}' is no slice axis of a 2D image; give index axis 0 (columns) or 1 "
                         "(rows), e.g. 1:100,130")
    if plane not in PLANES:
        raise InputError(f"slice plane '{plane}' is not one of {', '.join(PLANES)} or an index axis 0, 1, 2")
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))  # column k: index axis k in patient space
    return int(np.argmax(direction[PLANES[plane]]))


def plane_of(image: sitk.Image, axis: int) -> str | None:
    """The anatomical plane whose slices index `axis` of a 3D image walks across, for naming them to the user (None
    for a 2D image, or when no single plane falls on that axis)."""
    if image.GetDimension() != 3:
        return None
    names = [plane for plane in PLANES if index_axis(image, plane) == axis]
    return names[0] if len(names) == 1 else None


def slice_mask(image: sitk.Image, spec: str, where: str = "--slices") -> sitk.Image:
    """A mask of whole slices from `plane:i,j,k` (e.g. `axial:12,40,77`; indices on the image's grid)."""
    plane, _, indices = spec.partition(":")
    try:
        chosen = sorted({int(i) for i in indices.split(",") if i.strip()})
    except ValueError:
        raise InputError(f"{where}: '{spec}' is not PLANE:INDEX,INDEX,… (e.g. axial:12,40,77)") from None
    axis = index_axis(image, plane.strip().lower(), where)
    depth = image.GetSize()[axis]
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
        raise InputError(f"{where}: '{spec}' needs slice indices between 0 and {depth - 1} along image axis {axis}")
    array = np.zeros(image.GetSize(), np.uint8)  # (x, y, z) index order
    np.moveaxis(array, axis, 0)[chosen] = 1
    mask = sitk.GetImageFromArray(array.T)  # SimpleITK's array order is the reverse
    mask.CopyInformation(image)
    return mask


def touched_slices(corrected: np.ndarray, start: np.ndarray, marked: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """The whole slices a correction touched, as an annotated-voxel mask: the slices (along the axis in which the
    changed voxels occupy the fewest slices, the axis the user edited in) where `corrected` differs from the
    prediction it `start`ed from, plus slices the user `marked` as checked ((axis, index) pairs)."""
    mask = np.zeros(corrected.shape, bool)
    changed = corrected != start
    if changed.any():
        occupied = [np.flatnonzero(changed.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
        axis = int(np.argmin([len(planes) for planes in occupied]))
        np.moveaxis(mask, axis, 0)[occupied[axis]] = True
    for axis, index in marked:
        np.moveaxis(mask, axis, 0)[index] = True
    return mask


def with_unannotated(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The label with `UNANNOTATED` wherever `mask` is false."""
    return np.where(mask, label, UNANNOTATED).astype(label.dtype)


def write_slice_mask(image_path, spec: str, target) -> Path:
    """Write the mask of whole slices `spec` (`plane:i,j,…`) of the image file into `target`."""
    return write_image(slice_mask(read_image(image_path), spec), target)
