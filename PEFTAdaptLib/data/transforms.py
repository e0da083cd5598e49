"""Geometry and intensity transforms between a user's image grid and the grid a model expects.

Arrays here are in SimpleITK index order (x, y, z), i.e. the transpose of `sitk.GetArrayFromImage`, so that array
axis i walks along image axis i — the layout networks trained on nibabel arrays (deepbet, MeshNet) expect.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .limits import check_voxel_count


def to_array(image: sitk.Image, dtype=np.float32) -> np.ndarray:
    """The (x, y, z) — or (x, y) for a 2D image — array of an image."""
    return np.transpose(sitk.GetArrayFromImage(image)).astype(dtype, copy=False)


def from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap an (x, y, z) or (x, y) array into an image carrying `reference`'s geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    image.CopyInformation(reference)
    return image


def to_model_space(
    image: sitk.Image,
    spacing: Sequence[float] | None,
    orientation: str = "RAS",
    fit_size: Sequence[int] | None = None,
    margin: float = 0.1,
    locate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    what: str = "image",
) -> sitk.Image:
    """Reorient to `orientation` (DICOM letters, as nibabel's canonical 'RAS'; a 2D image keeps its own index order,
    as it has no anatomical frame to reorient in) and resample (linear).

    With `spacing`, the physical extent is kept and the grid gets that spacing (mm). With `fit_size`, the bounding box
    of the foreground — found by `locate(array)` (e.g. deepbet's brain locator) or else by an Otsu threshold — grown by
    `margin` on each side and clipped to the image, is resampled to exactly `fit_size` voxels: the framing networks
    such as deepbet were trained with. A grid beyond the voxel limit is refused (naming `what`) before resampling.
    """
    dims = image.GetDimension()
    oriented = sitk.DICOMOrient(image, orientation) if orientation and dims == 3 else image
    size = np.array(oriented.GetSize())
    old_spacing = np.array(oriented.GetSpacing())
    direction = np.array(oriented.GetDirection()).reshape(dims, dims)
    if fit_size is not None:
        if locate is not None:
            low, high = locate(to_array(oriented))
        else:
            otsu = sitk.OtsuThresholdImageFilter()
            otsu.Execute(sitk.Cast(oriented, sitk.sitkFloat32))
            coords = np.argwhere(to_array(oriented) > otsu.GetThreshold())
            low, high = (coords.min(0), coords.max(0) + 1) if len(coords) else (np.zeros(dims, int), size)
        grow = (high - low) * margin
        low = np.maximum(0, np.round(low - grow)).astype(int)
        high = np.minimum(size, np.round(high + grow)).astype(int)
        new_size = np.array(fit_size, dtype=int)
        new_spacing = (high - low) * old_spacing / new_size
        first_centre = np.array(oriented.TransformContinuousIndexToPhysicalPoint((low - 0.5).tolist()))
        new_origin = first_centre + direction @ (new_spacing / 2)
    elif spacing is not None and not np.allclose(old_spacing, spacing, rtol=1e-3):
        new_spacing = np.array(spacing, dtype=float)
        new_size = np.maximum(1, np.round(size * old_spacing / new_spacing)).astype(int)
        check_voxel_count(new_size, f"{what}: the image on the model's {'×'.join(map(str, spacing))} mm grid")
        # keep the centre of the field of view where it was
        old_centre = np.array(oriented.GetOrigin()) + direction @ ((size - 1) * old_spacing / 2)
        new_origin = old_centre - direction @ ((new_size - 1) * new_spacing / 2)
    else:
        return oriented
    background = float(sitk.GetArrayViewFromImage(oriented).min())
    return sitk.Resample(
        oriented, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear, [float(o) for o in new_origin],
        [float(s) for s in new_spacing], oriented.GetDirection(), background, oriented.GetPixelID(),
    )


def onto_grid(image: sitk.Image, reference: sitk.Image, is_label: bool = False) -> sitk.Image:
    """Resample `image` onto `reference`'s grid (size, spacing, origin, direction) in physical space."""
    return sitk.Resample(
        image, reference, sitk.Transform(), sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear, 0.0
    )


def probabilities_onto_grid(probs: np.ndarray, model_space: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Resample per-class probabilities (C, x, y, z) or (C, x, y) from the model grid onto the user's image grid."""
    return np.stack([to_array(onto_grid(from_array(p, model_space), reference)) for p in probs])


def pad_to_size(array: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
    """Pad a (C, x, y, z) array at the end of each spatial axis up to `size` with `value` (a volume smaller than the
    training patch still trains, on the patch the model expects)."""
    pads = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(size, array.shape[1:])]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def acquired_slices(image: sitk.Image, model_image: sitk.Image) -> np.ndarray | None:
    """Per plane along the model grid's last axis: the slice of `image` (along its axis closest to that one) the
    plane's labels were taken from, as nearest-neighbour resampling takes them at the plane's centre. On a model grid
    finer than the image's slices, consecutive planes share a slice: copies of one acquired slice, one observation.
    None for a 2D image or grid."""
    if image.GetDimension() != 3 or model_image.GetDimension() != 3:
        return None
    along = np.array(model_image.GetDirection()).reshape(3, 3)[:, 2]
    axis = int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3).T @ along)))
    nx, ny, nz = model_image.GetSize()
    centres = (model_image.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2, (ny - 1) / 2, float(k)))
               for k in range(nz))
    return np.floor([image.TransformPhysicalPointToContinuousIndex(p)[axis] + 0.5 for p in centres]).astype(int)


def slice_runs(planes: np.ndarray, layers: np.ndarray | None) -> list[np.ndarray]:
    """`planes` (indices along the model grid's last axis) in runs copied from one acquired slice each (`layers`:
    acquired_slices; None: every plane its own)."""
    if layers is None:
        return np.split(planes, np.arange(1, len(planes)))
    return np.split(planes, np.flatnonzero(np.diff(layers[planes]) != 0) + 1)
