"""Overlap and surface metrics on label maps (numpy, any grid spacing)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    p, r = prediction.astype(bool), reference.astype(bool)
    denominator = p.sum() + r.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, r).sum() / denominator)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from the surface voxels of `a` to the surface of `b`."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm; inf when exactly one mask is empty, 0 when both are."""
    flat = [axis for axis, size in enumerate(prediction.shape) if size == 1]  # a single slice: its plane
    p, r = np.squeeze(prediction, tuple(flat)).astype(bool), np.squeeze(reference, tuple(flat)).astype(bool)
    spacing = [s for axis, s in enumerate(spacing) if axis not in flat]
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float("inf")
    distances = np.concatenate([_surface_distances(p, r, spacing), _surface_distances(r, p, spacing)])
    return float(np.percentile(distances, 95))
