"""An audit from the annotated volumes a user has, when they gave no separate audit volume.

Each support volume gives up a slab along its last axis (a band of rows of a 2D image) (a quarter of it, centred on the middle of its foreground)
as audit; training patches come from the parts on either side, so no audited voxel is ever trained on. The volume
was normalised as a whole before it is cut (a slab is never re-normalised on its own: min–max or percentile
schemes would shift its intensities), so the audit sees exactly what inference sees.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import InputError
from .cases import Case

SHARE = 0.25  # of each support volume's depth held out


def hold_out(case: Case, share: float = SHARE) -> tuple[list[Case], Case, tuple[int, int]]:
    """(training parts, audit slab, the slab's range on the model grid's last axis) of one annotated case."""
    depth = case.array.shape[-1]
    width = max(1, round(depth * share))
    label = case.label[0]
    foreground = np.nonzero(label.any(axis=tuple(range(label.ndim - 1))))[0]
    if len(foreground) < 2:
        raise InputError(f"{case.name}: too little annotated foreground to hold out an audit slab; give an audit "
                         "volume")
    centre = int(np.median(foreground))
    start = min(max(0, centre - width // 2), depth - width)
    end = start + width
    cut = lambda a, b, tag: replace(case, name=f"{case.name}_{tag}", array=case.array[..., a:b],  # noqa: E731
                                    label=case.label[..., a:b], label_image=None)
    parts = [cut(a, b, f"z{a}-{b}") for a, b in ((0, start), (end, depth)) if b - a > 0]
    parts = [p for p in parts if p.label.any()]
    if not parts:
        raise InputError(f"{case.name}: all annotated foreground lies in the held-out audit slab; give an audit volume")
    return parts, cut(start, end, f"audit_z{start}-{end}"), (start, end)


def split_for_audit(support: Sequence[Case]) -> tuple[list[Case], list[Case], list[dict]]:
    """(training cases, audit cases, what was held out) from annotated support cases alone."""
    training, audit, held = [], [], []
    for case in support:
        parts, slab, (start, end) = hold_out(case)
        training += parts
        audit.append(slab)
        held.append({"case": case.name, "slab": [start, end], "depth": case.array.shape[-1]})
    return training, audit, held
