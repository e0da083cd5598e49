"""An audit from the annotated volumes a user has, when they gave no separate audit volume.

Each support volume gives up a slab along its last axis (a band of rows of a 2D image) (a quarter of it, centred on
the middle of its foreground; of whole acquired slices, and at least the five an audit needs to show a gain where the
volume keeps as many to train on) as audit; training patches come from the parts on either side, so no audited voxel
is ever trained on. The audit sees what inference sees: the volume was normalised as a whole before it is cut (min–max
or percentile schemes would shift a slab normalised alone), and the audit case is the whole volume with only the
slab's voxels annotated, so the slab is predicted in its volume's context (a network's receptive field reaches past
a cut slab's faces, where a cut slab would be predicted from padding instead).

A sparsely annotated volume (data/sparse.py) is not cut: its annotated voxels are divided instead, by the image slices
they came from (on a model grid finer than a thick slice, one corrected slice is several model planes of one label: held
out or trained on together, never split). Whole annotated slices (runs of annotated image slices, adjacent as the model
grid samples the axis the user annotated in) are held out — a quarter of the runs, at least one and never every run
holding foreground, spread evenly over those that do — when two or more hold foreground; the audit then measures what a
correction is for, slices nobody trained on. With one such run, a quarter of its slices around its foreground is held
out; with one slice, a strip of a quarter of its lines (along its first in-plane axis). The held-out voxels become
unannotated in the training case, so they never reach the loss; the audit case is the whole volume with only the
held-out voxels annotated.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, NeedsAnnotation
from .cases import Case
from .planar import user_grid
from .sparse import annotated, foreground, is_sparse, plane_of, with_unannotated
from .transforms import acquired_slices, onto_grid, slice_runs, to_array

SHARE = 0.25  # of each support volume's depth held out


def hold_out(case: Case, share: float = SHARE, fewest: int = 1) -> tuple[list[Case], Case, tuple[int, int]]:
    """(training parts, audit case, the slab's range on the model grid's last axis) of one annotated case; the audit
    case is the whole volume, annotated on the slab only. The slab is of whole acquired slices (the model planes
    copied from one thick slice are held out or trained on together, never both), `share` of them but at least
    `fewest` when as many are left to train on: the slabs an audit needs before any gain can be shown."""
    depth = case.array.shape[-1]
    runs = slice_runs(np.arange(depth), acquired_slices(case.image, case.model_image))
    firsts, ends = [int(r[0]) for r in runs], [int(r[-1]) + 1 for r in runs]  # the planes of each acquired slice
    slices = len(runs)
    width = max(1, round(slices * share), fewest if slices >= 2 * fewest else 1)
    label = case.label[0]
    foreground = np.nonzero(label.any(axis=tuple(range(label.ndim - 1))))[0]
    if len(foreground) < 2:
        raise InputError(f"{case.name}: too little annotated foreground to hold out an audit slab; give an audit "
                         "volume")
    centre = int(np.searchsorted(firsts, int(np.median(foreground)), side="right")) - 1
    first = min(max(0, centre - width // 2), slices - width)
    start, end = firsts[first], ends[first + width - 1]
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


def source_voxels(grid: sitk.Image, model_grid: sitk.Image) -> np.ndarray:
    """(dims, *model grid): the index on the user's `grid` of the voxel each model voxel took its label and mask from
    (the same nearest-neighbour resampling as prepare_case), so copies of one annotated slice on a finer model grid
    are known to be one slice."""
    size = grid.GetSize()
    flat = sitk.GetImageFromArray(np.arange(int(np.prod(size)), dtype=np.uint32).reshape(size[::-1]))
    flat.CopyInformation(grid)
    taken = to_array(onto_grid(flat, model_grid, is_label=True), np.int64)
    return np.stack(np.unravel_index(taken, size, order="F"))


def held_slab(index: np.ndarray, marked: np.ndarray, structure: np.ndarray, share: float) -> np.ndarray:
    """A quarter (`share`) of the annotated image slices along one axis (`index`: each model voxel's image index
    along it), centred on the structure's."""
    lines = np.unique(index[marked])
    width = max(1, round(len(lines) * share))
    centre = np.searchsorted(lines, np.median(np.unique(index[structure])))
    first = int(min(max(0, centre - width // 2), len(lines) - width))
    return lines[first:first + width]


def hold_out_annotated(case: Case, share: float = SHARE) -> tuple[Case, Case, dict]:
    """(training case, audit case, what was held out) of a sparsely annotated case (the rule above), decided on the
    image's grid: what came from one annotated image slice is held out or trained on whole, never both."""
    label = case.label[0]
    marked, structure = annotated(label), foreground(label)
    if not structure.any():
        raise NeedsAnnotation(f"{case.name}: no annotated voxel holds a structure; annotate slices through it or give "
                              "an audit volume")
    grid = user_grid(case.image, case.model_image.GetDimension())
    source = source_voxels(grid, case.model_image)
    # the axis the user annotated along: the one whose slices are annotated in the smallest share (20 sagittal
    # slices of a volume of 9 axial ones are 20 of 49 sagittal slices, and all 9 axial ones)
    axis = int(np.argmin([len(np.unique(index[marked])) / len(np.unique(index)) for index in source]))
    slices = np.unique(source[axis][marked])
    # adjacent as the model samples the image: on a model grid coarser than the image, every other image slice is
    # sampled, and two annotated slices with only unsampled ones between them are one run
    sampled = np.searchsorted(np.unique(source[axis]), slices)
    runs = np.split(slices, np.flatnonzero(np.diff(sampled) > 1) + 1)
    with_structure = [run for run in runs if np.isin(run, source[axis][structure]).any()]
    plane, within = plane_of(grid, axis), None
    if len(with_structure) >= 2:
        count = min(len(with_structure) - 1, max(1, round(len(runs) * share)))
        picks = [with_structure[round((i + 0.5) * len(with_structure) / count - 0.5)] for i in range(count)]
        chosen = np.concatenate(picks)
        held = np.isin(source[axis], chosen)
    elif len(with_structure[0]) > 1:  # one block of adjacent slices: a slab of whole slices
        chosen = held_slab(source[axis], marked, structure, share)
        held = np.isin(source[axis], chosen)
    else:  # one slice: a slab of its lines, along its first in-plane axis
        across = next(a for a in range(source.shape[0]) if a != axis)
        chosen, lines = with_structure[0], held_slab(source[across], marked, structure, share)
        held = np.isin(source[axis], chosen) & np.isin(source[across], lines)
        within = {"axis": across, "indices": lines.tolist()}
    held &= marked
    if not (structure & held).any() or not (structure & ~held).any():
        raise NeedsAnnotation(f"{case.name}: too few annotated slices hold the structure to keep some for an audit; "
                              "annotate more slices through it or give an audit volume")
    train = replace(case, label=with_unannotated(case.label, ~held[None]))
    audit = replace(case, name=f"{case.name}_audit", label=with_unannotated(case.label, held[None]), label_image=None)
    return train, audit, {"case": case.name, **({"plane": plane} if plane else {}), "axis": axis,
                          "slices": chosen.tolist(), **({"within": within} if within else {})}


def split_for_audit(support: Sequence[Case], fewest: int = 1) -> tuple[list[Case], list[Case], list[dict]]:
    """(training cases, audit cases, what was held out) from annotated support cases alone (`fewest`: hold_out's).
    A case that cannot give up an audit trains whole when another one does."""
    training, audit, held, refused = [], [], [], []
    for case in support:
        try:
            if is_sparse(case.label):
                part, slab, where = hold_out_annotated(case)
                parts = [part]
            else:
                parts, slab, (start, end) = hold_out(case, fewest=fewest)
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
