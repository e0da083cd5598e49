"""Read and write medical images through SimpleITK, keeping geometry, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _check_suffix(path: Path) -> None:
    if not str(path).lower().endswith(SUPPORTED_SUFFIXES):
        raise InputError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3D scalar image; refuse missing, corrupt, non-3D, multi-component and non-finite files."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"{path}: cannot read {what} (corrupt or not an image): {reason}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{path}: {what} is {image.GetDimension()}D with size {image.GetSize()}; a 3D volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a single-channel volume is required"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"{path}: {what} has size {image.GetSize()}; a 3D volume (not a single slice) is required")
    if what == "image":
        array = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(array).all():
            raise InputError(f"{path}: image contains NaN or infinite intensities; fix or mask them before adapting")
    return image


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed), creating the folder; geometry is written exactly as held by `image`."""
    path = Path(path)
    _check_suffix(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot write output ({exc}); check the folder exists and is writable") from None
    return path


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within `tolerance`)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(1.0, max(map(abs, a.GetOrigin()))))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def read_label(path: str | Path, image: sitk.Image, image_path: str | Path, allowed_values: set[int]) -> sitk.Image:
    """Read a label map and check it lies on the image's grid, holds known integer values and is not empty."""
    label = read_image(path, what="label")
    if label.GetSize() != image.GetSize():
        raise InputError(
            f"{path}: label size {label.GetSize()} differs from image {image_path} size {image.GetSize()}; "
            "the label must be drawn on the same grid as its image"
        )
    if not same_geometry(label, image):
        raise InputError(
            f"{path}: label geometry (spacing/origin/direction) differs from image {image_path}; resample the label "
            "onto the image grid"
        )
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if not np.allclose(values, np.round(values)):
        raise InputError(f"{path}: label holds non-integer values; a label map of integer classes is required")
    unknown = sorted(set(int(v) for v in values) - set(allowed_values))
    if unknown:
        raise InputError(
            f"{path}: label values {unknown} are not classes of this model (known: {sorted(allowed_values)})"
        )
    if not (values != 0).any():
        raise InputError(f"{path}: label is empty (no foreground voxel); annotate at least one structure")
    return sitk.Cast(label, sitk.sitkUInt8)
