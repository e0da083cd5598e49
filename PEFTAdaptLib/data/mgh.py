"""FreeSurfer's MGH/MGZ volumes through nibabel (SimpleITK cannot read them), with geometry converted exactly.

nibabel gives a voxel → RAS affine; ITK holds spacing, origin and direction cosines in LPS. The two differ by
negating the first two world axes: affine_LPS = diag(-1, -1, 1) · affine_RAS. Array axes stay (x, y, z) = (i, j, k).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .formats import MGH_SUFFIXES
from .integrity import unreadable

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: the voxel types the MGH format stores; anything else is written as the smallest of these that holds its values
MGH_DTYPES = (np.uint8, np.int16, np.int32, np.float32)


def is_mgh(path: str | Path) -> bool:
    return str(path).lower().endswith(MGH_SUFFIXES)


def itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, row-major direction) in LPS of a voxel → RAS affine."""
    linear = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The voxel → RAS affine of an ITK image (inverse of `itk_geometry`)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin())
    return affine


def read_mgh(path: Path, what: str = "image") -> sitk.Image:
    """An MGH/MGZ volume as an ITK image (several frames give a 4D image, which `read_image` refuses)."""
    import nibabel as nib

    try:
        volume = nib.load(str(path))
        array = np.asanyarray(volume.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file; all mean "unreadable"
        raise unreadable(path, what, exc) from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T, dtype=array.dtype.newbyteorder("=")))
    if array.ndim == 3:
        spacing, origin, direction = itk_geometry(volume.affine)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    return image


def _mgh_array(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).T
    if array.dtype in MGH_DTYPES:
        return array
    if array.dtype.kind in "iub" and array.size:
        low, high = array.min(), array.max()
        fitting = next((t for t in MGH_DTYPES[:3] if np.iinfo(t).min <= low and high <= np.iinfo(t).max), None)
        if fitting is not None:
            return array.astype(fitting)
    return array.astype(np.float32)


def write_mgh(image: sitk.Image, path: Path) -> None:
    """Write `image` as MGH (`.mgz`: compressed) with its geometry as the RAS affine."""
    import nibabel as nib

    nib.MGHImage(_mgh_array(image), ras_affine(image)).to_filename(str(path))
