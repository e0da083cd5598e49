"""Demo target domain made from files inside installed wheels only: nilearn's MNI152 (ICBM 2009a) T1 template and
its grey/white-matter maps, with a documented acquisition shift applied so that deepbet (trained on T1w) meets an
unfamiliar contrast.

The shift, per generated volume (its own seed):
1. contrast: a T2-like inversion inside the head, I' = 1 - I for tissue (CSF bright, white matter dark), background 0;
2. a random small rigid motion + scaling (±6°, ±4 %), so support, audit and test volumes differ in anatomy position;
3. a smooth multiplicative bias field exp(Σ low-order terms), amplitude ±35 %;
4. Rician-like noise at 4 % of the tissue intensity range.
The reference brain mask is the template's GM + WM probability > 0.1, closed (3 iterations) and hole-filled
(deepbet's own pipeline scores Dice 0.987 against it on the unshifted template),
moved by the same motion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .data.transforms import from_array, to_array


@dataclass(frozen=True)
class ShiftParameters:
    rotation_deg: float = 6.0
    scale: float = 0.04
    bias_amplitude: float = 0.35
    noise: float = 0.04


def template_images() -> tuple[sitk.Image, sitk.Image]:
    """nilearn's MNI152 T1 template and a brain mask from its tissue maps (both 1 mm, 197×233×189)."""
    from nilearn import datasets

    t1 = sitk.ReadImage(datasets.MNI152_FILE_PATH, sitk.sitkFloat32)
    gm = to_array(sitk.ReadImage(datasets.GM_MNI152_FILE_PATH, sitk.sitkFloat32))
    wm = to_array(sitk.ReadImage(datasets.WM_MNI152_FILE_PATH, sitk.sitkFloat32))
    scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0  # nilearn stores the maps as 0..255
    mask = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) / scale > 0.1, iterations=3))
    return t1, from_array(mask.astype(np.uint8), t1)


def _random_rigid(reference: sitk.Image, rng: np.random.Generator, shift: ShiftParameters) -> sitk.Transform:
    size = np.array(reference.GetSize())
    centre = reference.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
    transform = sitk.Similarity3DTransform()
    transform.SetCenter(centre)
    angles = np.deg2rad(rng.uniform(-shift.rotation_deg, shift.rotation_deg, 3))
    rotation = sitk.Euler3DTransform(centre, *angles)
    transform.SetMatrix(rotation.GetMatrix())
    transform.SetScale(float(1 + rng.uniform(-shift.scale, shift.scale)))
    transform.SetTranslation(rng.uniform(-4, 4, 3).tolist())
    return transform


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = np.zeros(shape, np.float32)
    for _ in range(4):
        powers = rng.integers(0, 3, 3)
        term = np.ones(shape, np.float32)
        for g, p in zip(grids, powers):
            term = term * g.astype(np.float32) ** int(p)
        field += rng.normal(0, 1) * term
    field /= max(np.abs(field).max(), 1e-6)
    return np.exp(amplitude * field).astype(np.float32)


def shifted_case(seed: int, shift: ShiftParameters = ShiftParameters()) -> tuple[sitk.Image, sitk.Image]:
    """One target-domain volume and its reference brain mask, both on the template's grid."""
    rng = np.random.default_rng(seed)
    t1, mask = template_images()
    transform = _random_rigid(t1, rng, shift)
    t1 = sitk.Resample(t1, t1, transform, sitk.sitkLinear, 0.0)
    mask = sitk.Resample(mask, mask, transform, sitk.sitkNearestNeighbor, 0)
    x = to_array(t1)
    x = x / max(float(np.percentile(x[x > 0], 99.5)), 1e-6)
    tissue = ndimage.binary_closing(x > 0.03, iterations=2)
    t2_like = np.where(tissue, np.clip(1.05 - x, 0, None), 0.0).astype(np.float32)
    t2_like *= _bias_field(x.shape, rng, shift.bias_amplitude)
    sigma = shift.noise
    noisy = np.sqrt((t2_like + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)
    image = from_array((1000 * noisy).astype(np.float32), t1)
    return image, sitk.Cast(mask, sitk.sitkUInt8)
