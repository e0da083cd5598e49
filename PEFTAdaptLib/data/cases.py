"""A case: one image (one or more channels) and its optional label, on the user's grid and on the model's grid."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, NeedsAnnotation
from ..models.card import ModelCard
from .io import read_image, read_label, same_geometry
from .planar import check_dimensions, user_grid
from .sparse import read_annotated, with_unannotated
from .normalize import normalize_intensity
from .transforms import onto_grid, to_array, to_model_space


@dataclass
class Case:
    name: str
    image: sitk.Image  # first channel on the user's grid: the geometry predictions are written with
    model_image: sitk.Image  # first channel on the model's grid: the geometry of `array`
    array: np.ndarray  # (C, x, y, z) float32, normalised ((C, x, y) for a 2D model)
    #: (1, x, y, z) uint8 class indices (card.labels order) on the model's grid; UNANNOTATED (data/sparse.py) where
    #: a sparse label does not count
    label: np.ndarray | None = None
    label_image: sitk.Image | None = None  # label on the user's grid (for evaluation)
    #: the label is of slices a user annotated or corrected (sparse), not a whole volume: an audit of too few of them
    #: for a verdict cuts them into bands of rows (selection.AuditCounts.measure)
    corrected: bool = False


def prepare_case(
    name: str, channels: Sequence[sitk.Image], card: ModelCard, label: sitk.Image | None = None, locate=None,
    annotated: sitk.Image | None = None,
) -> Case:
    """Move images (and label) to the model's grid and normalise intensities as the card says.

    `locate` (a FoundationModel's) finds the box a `fit_to_roi` model frames; None falls back to an Otsu head box.
    A 2D model sees single slices as planes (`planar.py`).
    `annotated` (a mask on the label's grid) marks the voxels whose label counts; the others become `UNANNOTATED`
    (nearest neighbour: a model voxel counts when the label value it takes came from an annotated voxel).
    """
    if len(channels) != card.input_channels:
        raise InputError(f"{name}: {len(channels)} image channel(s) given; model '{card.id}' needs "
                         f"{card.channel_count()}")
    for channel in channels:
        check_dimensions(channel, card.spatial_dims, card.id, f"{name}: image")
    planes = [user_grid(c, card.spatial_dims) for c in channels]
    model_image = to_model_space(
        planes[0], card.spacing, card.orientation, card.inference_roi if card.fit_to_roi else None, locate=locate,
        what=name,
    )
    arrays = [to_array(model_image)] + [to_array(onto_grid(c, model_image)) for c in planes[1:]]
    array = np.stack([normalize_intensity(a, card.normalization) for a in arrays]).astype(np.float32)
    label_array = None
    if label is not None:
        values = to_array(onto_grid(user_grid(label, card.spatial_dims), model_image, is_label=True), np.int64)
        lookup = np.zeros(max(card.label_values) + 1, dtype=np.uint8)
        for index, info in enumerate(card.labels):
            lookup[info.value] = index
        label_array = lookup[np.clip(values, 0, len(lookup) - 1)][None]
        if annotated is not None:
            label_array = with_unannotated(label_array, annotated_on_grid(annotated, model_image, card, name)[None])
    return Case(name, channels[0], model_image, array, label_array, label, corrected=annotated is not None)


def annotated_on_grid(annotated: sitk.Image, model_image: sitk.Image, card: ModelCard, name: str) -> np.ndarray:
    """The annotated-voxel mask on the model's grid; refused when none of its voxels reaches that grid."""
    mask = to_array(onto_grid(user_grid(annotated, card.spatial_dims), model_image, is_label=True), np.uint8) > 0
    if not mask.any():
        raise NeedsAnnotation(f"{name}: no annotated voxel reaches the model's grid (its slices fall between the "
                              "model's samples); annotate more slices")
    return mask


def check_annotated_reaches_grid(annotated: sitk.Image, card: ModelCard, mask_path: str, image_path: str) -> None:
    """Before a job exists: the worker's refusal of a mask whose slices all fall between the model's samples. The
    mask lies on the image's grid, so it gives the model's grid as the image would; a model that frames the head
    (`fit_to_roi`) places its grid with its locator, so the worker checks those."""
    if not card.fit_to_roi:
        grid = to_model_space(user_grid(annotated, card.spatial_dims), card.spacing, card.orientation,
                              what=image_path)
        annotated_on_grid(annotated, grid, card, mask_path)


def read_case_files(
    image_paths: Sequence[str | Path], card: ModelCard, label_path: str | Path | None = None
) -> tuple[list[sitk.Image], sitk.Image | None]:
    """Read a case's channels and label, checking them against each other and against what the model takes."""
    paths = list(image_paths)
    if len(paths) != card.input_channels:
        raise InputError(f"{paths[0]}: {len(paths)} image channel(s) given; model '{card.id}' needs "
                         f"{card.channel_count()}")
    channels = [read_image(p) for p in paths]
    for path, channel in zip(paths, channels):
        check_dimensions(channel, card.spatial_dims, card.id, f"{path}: image")
        voxels = sitk.GetArrayViewFromImage(channel)
        if voxels.min() == voxels.max():  # a blank export or a mask given as the image: nothing to segment
            raise InputError(f"{path}: image is constant (every voxel {voxels.flat[0]:g}); give the scan itself")
    for path, channel in zip(paths[1:], channels[1:]):
        if not same_geometry(channel, channels[0]):
            raise InputError(f"{path}: geometry differs from the first channel {paths[0]}; co-register the channels")
    label = read_label(label_path, channels[0], paths[0], card.label_values) if label_path is not None else None
    return channels, label


def load_case(
    image_paths: str | Path | Sequence[str | Path], card: ModelCard, label_path: str | Path | None = None, locate=None,
    annotated_path: str | Path | None = None, name: str | None = None,
) -> Case:
    """Read a case from files onto the model's grid (`annotated_path`: the mask of the label's annotated voxels;
    `name`: what its messages call it, by default its first file's)."""
    paths = [image_paths] if isinstance(image_paths, (str, Path)) else list(image_paths)
    channels, label = read_case_files(paths, card, label_path)
    annotated = read_annotated(annotated_path, channels[0], paths[0]) if annotated_path is not None else None
    return prepare_case(name or Path(paths[0]).name.split(".")[0], channels, card, label, locate, annotated)
