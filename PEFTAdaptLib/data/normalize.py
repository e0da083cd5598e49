"""Intensity normalisations a model card names: each scheme once, with the settings it requires, so that the card
check and the transform cannot disagree on which names exist."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import PEFTAdaptError

#: numeric settings a normalisation may carry (`clip` is a switch)
NUMBERS = ("lower", "upper", "out_min", "out_max", "mean", "std", "p_low", "p_high", "scale", "shift", "nonzero")


@dataclass(frozen=True)
class Normalization:
    apply: Callable[[np.ndarray, dict], np.ndarray]  # (float32 copy of the volume, the card's scheme)
    required: tuple[str, ...] = ()


def _zscore(x: np.ndarray, scheme: dict) -> np.ndarray:
    region = x[x > scheme["nonzero"]] if "nonzero" in scheme else x
    return (x - region.mean()) / max(float(region.std()), 1e-8)


def _clip_scale(x: np.ndarray, scheme: dict) -> np.ndarray:
    lo, hi = scheme["lower"], scheme["upper"]
    out_lo, out_hi = scheme.get("out_min", 0.0), scheme.get("out_max", 1.0)
    x = np.clip(x, lo, hi) if scheme.get("clip", True) else x
    return (x - lo) / (hi - lo) * (out_hi - out_lo) + out_lo


def _ct_zscore(x: np.ndarray, scheme: dict) -> np.ndarray:
    return (np.clip(x, scheme["lower"], scheme["upper"]) - scheme["mean"]) / max(scheme["std"], 1e-8)


def _minmax(x: np.ndarray, scheme: dict) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-8)


def _percentile_zscore(x: np.ndarray, scheme: dict) -> np.ndarray:
    lo, hi = np.percentile(x, [scheme.get("p_low", 0.5), scheme.get("p_high", 99.5)])
    x = np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    x = (x - x.mean()) / max(float(x.std()), 1e-8)
    return scheme.get("scale", 1.0) * x + scheme.get("shift", 0.0)


NORMALIZATIONS = {
    "none": Normalization(lambda x, scheme: x),
    "zscore": Normalization(_zscore),
    "minmax": Normalization(_minmax),
    "percentile_zscore": Normalization(_percentile_zscore),
    "clip_scale": Normalization(_clip_scale, ("lower", "upper")),
    "ct_zscore": Normalization(_ct_zscore, ("lower", "upper", "mean", "std")),
}


def normalize_intensity(array: np.ndarray, scheme: dict) -> np.ndarray:
    """Intensity normalisation named by a model card.

    - `zscore`: (x - mean) / std over the volume (or over voxels > `nonzero` if given);
    - `clip_scale`: clip to [lower, upper] (e.g. CT HU) then scale to [0, 1] (or [out_min, out_max]; `clip`: false
      scales without clipping, as MONAI's ScaleIntensityRanged does by default);
    - `ct_zscore`: clip to [lower, upper] then (x - mean) / std with dataset-wide values (nnU-Net's CTNormalization);
    - `minmax`: scale the volume's own [min, max] to [0, 1] (brainchop's MeshNet input);
    - `percentile_zscore`: clip to percentiles [p_low, p_high], scale to [0, 1], z-score, then `scale`·z + `shift`
      (deepbet's own normalisation: percentiles 0.5/99.5, scale 0.226, shift 0.449);
    - `none`.
    """
    name = scheme.get("name", "none")
    if name not in NORMALIZATIONS:
        raise PEFTAdaptError(f"unknown intensity normalisation '{name}' in the model card")
    return NORMALIZATIONS[name].apply(array.astype(np.float32, copy=True), scheme)
