"""The largest volume PEFTAdapt will hold, checked from a header (or a planned grid) before any voxel is allocated.

A 70-byte gzip can declare 1200³ voxels; reading it first and failing later costs gigabytes. The limit counts
voxels (times components or frames), and is set with `PEFTADAPT_MAX_VOXELS`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..errors import InputError

MAX_VOXELS_ENV = "PEFTADAPT_MAX_VOXELS"
#: 512 × 512 × 1024 (a long CT series): 1 GiB per float32 copy, and reading plus resampling holds several copies
DEFAULT_MAX_VOXELS = 512 * 512 * 1024


def max_voxels() -> int:
    """The limit in force: `$PEFTADAPT_MAX_VOXELS` when set (a positive integer), else the default."""
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise InputError(f"{MAX_VOXELS_ENV}={value!r}: not a positive number of voxels")
    return limit


def check_voxel_count(shape: Sequence[int], what: str) -> None:
    """Refuse `what` (e.g. "<file>: image") when its grid of `shape` (every dimension counted) is beyond the limit."""
    count, limit = math.prod(int(s) for s in shape), max_voxels()
    if count > limit:
        dims = "×".join(str(int(s)) for s in shape)
        raise InputError(
            f"{what} is {dims} = {count:,} voxels (about {count * 4 / 2**30:.2g} GiB per float32 copy), beyond the "
            f"limit of {limit:,} voxels; crop or downsample it, or raise {MAX_VOXELS_ENV} if this machine has the "
            "memory"
        )
