"""2D images for 2D models: a radiograph or ultrasound frame (PNG, TIFF, a DICOM file) or a single slice of a
volume (one axis of size 1, as Slicer holds a slice), seen as a plane; predictions go back on the input's own grid.

A model card's `spatial_dims` says which a model takes; a volume given to a 2D model (or a slice to a 3D one) is
refused in one line naming the file.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .transforms import from_array


def single_slice_axis(image: sitk.Image) -> int | None:
    """The axis of size 1 of a 3D image that has exactly one, else None."""
    flat = [axis for axis, size in enumerate(image.GetSize()) if size == 1]
    return flat[0] if image.GetDimension() == 3 and len(flat) == 1 else None


def is_planar(image: sitk.Image) -> bool:
    return image.GetDimension() == 2 or single_slice_axis(image) is not None


def check_dimensions(image: sitk.Image, spatial_dims: int, model_id: str, where: str) -> None:
    """Refuse an image the model cannot take: a slice for a 3D model, a volume for a 2D one (`where` names it)."""
    size = image.GetSize()
    if spatial_dims == 2 and not is_planar(image):
        raise InputError(f"{where} is a volume of size {size}; model '{model_id}' is 2D: give a 2D image or a "
                         "single slice (one axis of size 1)")
    if spatial_dims == 3 and (image.GetDimension() != 3 or min(size) < 2):
        raise InputError(f"{where} has size {size}; model '{model_id}' is 3D: a volume (not a single slice or a 2D "
                         "image) is required")


def planar(image: sitk.Image) -> sitk.Image:
    """The image as a 2D plane: a 2D image itself; a single slice its pixels with the in-plane spacing (origin 0,
    identity direction: only the in-plane grid matters, predictions go back by index through `on_grid_of`)."""
    axis = single_slice_axis(image)
    if axis is None:
        return image
    keep = [a for a in range(3) if a != axis]
    plane = sitk.GetImageFromArray(np.ascontiguousarray(np.squeeze(sitk.GetArrayViewFromImage(image),
                                                                   axis=2 - axis)))
    plane.SetSpacing([image.GetSpacing()[a] for a in keep])
    return plane


def user_grid(image: sitk.Image, spatial_dims: int) -> sitk.Image:
    """The grid a model's output is resampled onto: the image's own, or its plane for a 2D model."""
    return planar(image) if spatial_dims == 2 else image


def on_grid_of(array: np.ndarray, image: sitk.Image) -> sitk.Image:
    """An array on `user_grid(image, …)` as an image with `image`'s own geometry (a slice gets its size-1 axis
    back)."""
    return from_array(array.reshape(image.GetSize()), image)

