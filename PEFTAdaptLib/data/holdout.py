"""An audit from the annotated volumes a user has, when they gave no separate audit volume.

Each support volume gives up a slab along its last axis (a band of rows of a 2D image) (a quarter of it, centred on
the middle of its foreground) as audit; training patches come from the parts on either side, so no audited voxel is
ever trained on. The audit sees what inference sees: the volume was normalised as a whole before it is cut (min–max
or percentile schemes would shift a slab normalised alone), and the audit case is the whole volume with only the
slab's voxels annotated, so the slab is predicted in its volume's context (a network's receptive field reaches past
a cut slab's faces, where a cut slab would be predicted from padding instead).

A sparsely annotated volume (data/sparse.py) is not cut: its annotated voxels are divided instead. Whole annotated
slices (runs of annotated planes along the model grid's last axis) are held out — a quarter of the runs, at least
one and never every run holding foreground, spread evenly over those that do — when two or more hold foreground;
the audit then measures what a
correction is for, slices nobody trained on. With one such run (one corrected slice, a block of slices, or slices
across the last axis) a slab of a quarter of its annotated planes around its foreground is held out (along the last
axis; across a single slice, along the first). The held-out voxels become unannotated in the training case, so
they never reach the loss; the audit case is the whole volume with only the held-out voxels annotated.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import InputError, NeedsAnnotation
from .cases import Case
from .sparse import annotated, foreground, is_sparse, with_unannotated

SHARE = 0.25  # of each support volume's depth held out


def hold_out(case: Case, share: float = SHARE) -> tuple[list[Case], Case, tuple[int, int]]:
    """(training parts, audit case, the slab's range on the model grid's last axis) of one annotated case; the audit
    case is the whole volume, annotated on the slab only."""
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
    slab = np.zeros(case.label.shape, bool)
    slab[..., start:end] = True
    audit = replace(case, name=f"{case.name}_audit_z{start}-{end}", label=with_unannotated(case.label, slab),
                    label_image=None)
    return parts, audit, (start, end)


def hold_out_annotated(case: Case, share: float = SHARE) -> tuple[Case, Case, dict]:
    """(training case, audit case, what was held out) of a sparsely annotated case (the rule above)."""
    label = case.label[0]
    marked, structure = annotated(label), foreground(label)
    planes = np.flatnonzero(marked.any(axis=(0, 1)))
    runs = np.split(planes, np.flatnonzero(np.diff(planes) > 1) + 1)
    with_structure = [run for run in runs if structure[..., run].any()]
    if len(with_structure) >= 2:
        count = min(len(with_structure) - 1, max(1, round(len(runs) * share)))
        picks = [with_structure[round((i + 0.5) * len(with_structure) / count - 0.5)] for i in range(count)]
        axis, chosen = 2, np.concatenate(picks)
    elif with_structure:
        axis = 2 if len(with_structure[0]) > 1 else 0
        other = tuple(a for a in range(3) if a != axis)
        lines = np.flatnonzero(marked.any(axis=other))
        width = max(1, round(len(lines) * share))
        centre = np.searchsorted(lines, np.median(np.flatnonzero(structure.any(axis=other))))
        first = int(min(max(0, centre - width // 2), len(lines) - width))
        chosen = lines[first:first + width]
    else:
        raise NeedsAnnotation(f"{case.name}: no annotated voxel holds a structure; annotate slices through it or give an "
                         "audit volume")
    held = np.zeros(label.shape, bool)
    np.moveaxis(held, axis, 0)[chosen] = True
    held &= marked
    if not (structure & held).any() or not (structure & ~held).any():
        raise NeedsAnnotation(f"{case.name}: too few annotated slices hold the structure to keep some for an audit; "
                         "annotate more slices through it or give an audit volume")
    train = replace(case, label=with_unannotated(case.label, ~held[None]))
    audit = replace(case, name=f"{case.name}_audit", label=with_unannotated(case.label, held[None]), label_image=None)
    return train, audit, {"case": case.name, "axis": axis, "slices": chosen.tolist()}


def split_for_audit(support: Sequence[Case]) -> tuple[list[Case], list[Case], list[dict]]:
    """(training cases, audit cases, what was held out) from annotated support cases alone. A case that cannot
    give up an audit trains whole when another one does."""
    training, audit, held, refused = [], [], [], []
    for case in support:
        try:
            if is_sparse(case.label):
                part, slab, where = hold_out_annotated(case)
                parts = [part]
            else:
                parts, slab, (start, end) = hold_out(case)
                where = {"case": case.name, "slab": [start, end], "depth": case.array.shape[-1]}
        except InputError as exc:
            refused.append(exc)
            training.append(case)
            continue
        training += parts
        audit.append(slab)
        held.append(where)
    if not audit:
        raise refused[0]
    return training, audit, held
