"""Read and write medical images, keeping geometry, with errors that name the file.

NIfTI, NRRD and MetaImage go through SimpleITK, FreeSurfer's MGH/MGZ through nibabel (`mgh.py`). Before any voxel
is read, the header's size is held against the voxel limit (`limits.py`), and NIfTI/MGH files are checked against
their header (`integrity.py`): SimpleITK would read them truncated or with NaN turned into 0.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .formats import CHECKED_AGAINST_HEADER, image_suffix
from .integrity import check_against_header, unreadable
from .limits import check_voxel_count
from .mgh import is_mgh, read_mgh, write_mgh


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 2D or 3D scalar image (a grey one saved as RGB taken as grey); refuse missing, corrupt, truncated,
    oversized, other-dimensional, colour and non-finite files. Whether a single slice suits the model is the model
    card's question (`cases.check_dimensions`)."""
    path = Path(path)
    if path.is_dir():  # a folder (a DICOM series too) is no image we read: say so, not "not found" or its suffix
        raise InputError(f"{path}: is a folder, not a{'n' * (what[0] in 'aeiou')} {what} file")
    checked = image_suffix(path) in CHECKED_AGAINST_HEADER
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    if checked:
        check_against_header(path, what)
    image = read_mgh(path, what) if is_mgh(path) else _read_with_itk(path, what)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path}: {what} is {image.GetDimension()}D with size {image.GetSize()}; a 2D image or a 3D "
                         "volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        image = grey_of(image, path, what)
    floating = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    if floating and not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise InputError(f"{path}: {what} contains NaN or infinite values; fix or mask them before use")
    return image


def _read_with_itk(path: Path, what: str) -> sitk.Image:
    """SimpleITK's reader, after checking the size its header declares against the voxel limit."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        components = reader.GetNumberOfComponents()
        check_voxel_count((*reader.GetSize(), *([components] if components > 1 else [])), f"{path}: {what}")
        return reader.Execute()
    except RuntimeError as exc:
        raise unreadable(path, what, exc) from None


def grey_of(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """A grey image saved in colour (RGB, or RGBA with a constant alpha, every colour channel equal: how radiographs
    and screenshots are often exported) as its one channel; true colour is refused, since models take one channel."""
    channels = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)  # (..., channels)
    colour, alpha = array[..., :3], array[..., 3:]
    if channels not in (3, 4) or alpha.min(initial=0) != alpha.max(initial=0) or (colour != colour[..., :1]).any():
        raise InputError(f"{path}: {what} has {channels} channels per voxel (colour); a single-channel image is "
                         "required: save it as greyscale")
    grey = sitk.GetImageFromArray(colour[..., 0])
    grey.CopyInformation(image)
    return grey


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed), creating the folder; geometry is written exactly as held by `image`."""
    path = Path(path)
    image_suffix(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_mgh(path):
            write_mgh(image, path)
        else:
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


def check_on_grid(label: sitk.Image, path: str | Path, image: sitk.Image, image_path: str | Path) -> None:
    """A label drawn on its image's grid: the same size and geometry, or one line naming both files."""
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


def check_integer(values: np.ndarray, path: str | Path) -> None:
    if not np.allclose(values, np.round(values)):
        raise InputError(f"{path}: label holds non-integer values; a label map of integer classes is required")


def read_label(path: str | Path, image: sitk.Image, image_path: str | Path, allowed_values: set[int]) -> sitk.Image:
    """Read a label map and check it lies on the image's grid, holds known integer values and is not empty."""
    label = read_image(path, what="label")
    check_on_grid(label, path, image, image_path)
    values = np.unique(sitk.GetArrayViewFromImage(label))
    check_integer(values, path)
    unknown = sorted(set(int(v) for v in values) - set(allowed_values))
    if unknown:
        many = len(unknown) > 8  # an image given as the label: its list would fill the screen
        shown = ", ".join(map(str, unknown[:8])) + (f", … ({len(unknown)} values)" if many else "")
        foreground = sorted(allowed_values - {0})
        binary = len(foreground) == 1 and unknown == [int(v) for v in values if v != 0]  # e.g. a 0/255 mask
        numbering = ("labels in another numbering (a label map maps them onto the model's classes: the command "
                     "line's --label-map, the label map of the browser app or the Slicer panel)")
        hint = (f"; is it an image rather than a label map, or {numbering}?" if many else
                f"; a binary mask: save its foreground as {foreground[0]}" if binary else f"; {numbering}?")
        raise InputError(f"{path}: label values [{shown}] are not classes of this model (known: "
                         f"{sorted(allowed_values)}){hint}")
    if not (values != 0).any():
        raise InputError(f"{path}: label is empty (no foreground voxel); annotate at least one structure")
    return sitk.Cast(label, sitk.sitkUInt8)


def volume_digest(image: sitk.Image) -> str:
    """A volume's identity from its voxels and geometry, whatever its file is called: a job can tell an audit volume
    from a training volume, and a later job whether it predicts a volume the adapter was trained and audited on."""
    geometry = [image.GetSize(), [round(v, 4) for v in image.GetSpacing()], [round(v, 3) for v in image.GetOrigin()],
                [round(v, 4) for v in image.GetDirection()], image.GetPixelIDTypeAsString()]
    digest = hashlib.sha256(json.dumps(geometry).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()
