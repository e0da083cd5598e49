"""Where a prediction is unsure, and which slices a correction should go to first.

Every prediction is written with a per-voxel uncertainty map beside it (same grid as the input): the entropy of the
softmax, divided by log(classes) so that 1 means "all classes equally likely"; when an adapter is applied, also
the disagreement between the adapted and the base model (total-variation distance of their class probabilities:
1 where they put their mass on different classes). The entropy comes from the prediction's own forward pass; the
disagreement costs one forward pass of the base model (the adapter's units gated off).

The slice ranking (`<name>_slices.json`) scores each slice, along each of the image's three index axes, by the
summed uncertainty (entropy + disagreement) within a few voxels of the predicted structure — where a wrong boundary
or a missed or spurious piece shows up — and orders them greedily so that neighbouring slices, which a correction
of one already mostly fixes, come later. Every other pick covers the volume instead: the slice that holds image
farthest from every slice picked or corrected so far, since a structure the model misses with confidence shows no
uncertainty anywhere and only a look elsewhere finds it (docs/sparse.md).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data.formats import image_suffix, map_suffix
from .data.sparse import PLANES, index_axis
from .data.planar import on_grid_of
from .data.transforms import to_array

#: voxels around the predicted structure whose uncertainty a slice's score sums (the structure's neighbourhood)
NEIGHBOURHOOD = 3
#: a slice ranked next pushes its neighbours within this many slices behind every slice farther away
SUPPRESS = 2


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Softmax entropy per voxel of (C, x, y, z) probabilities, in [0, 1] (divided by log C)."""
    p = np.clip(probabilities, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(0) / np.log(len(probabilities))).astype(np.float32)


def disagreement(adapted: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Total-variation distance per voxel between two (C, x, y, z) probability maps, in [0, 1]."""
    return (0.5 * np.abs(adapted - base).sum(0)).astype(np.float32)


def rank_slices(uncertainty: np.ndarray, prediction: np.ndarray, image: sitk.Image,
                corrected: np.ndarray | None = None) -> dict:
    """Slices ranked by where a correction is expected to help most, along each index axis of `image`'s grid;
    whole slices of `corrected` (the voxels the user annotated already) count as picked and are not listed."""
    from scipy import ndimage  # here: the Slicer panel imports this module for its file names, without scipy

    structure = prediction > 0
    near = ndimage.binary_dilation(structure, iterations=NEIGHBOURHOOD) if structure.any() else np.ones_like(structure)
    weighted = uncertainty * near
    intensities = to_array(image)
    content = intensities > intensities.min()  # voxels that hold image (not the background fill)
    planes = {}
    for plane in PLANES:
        axis = index_axis(image, plane)
        others = tuple(a for a in range(3) if a != axis)
        scores = weighted.sum(axis=others)
        extent = image_extent(content.any(axis=others))
        taken = np.flatnonzero(corrected.all(axis=others)) if corrected is not None else ()
        # the plane's slices laid out contiguously, once: every slice is ranked, and cutting each from the volume
        # across its strides took seconds a volume
        along, holds = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (weighted, content))
        slices = []
        for index, reason in ranked(scores, taken, extent):
            at = focus(along[index], holds[index], reason)
            at.insert(axis, index)
            slices.append({"index": index, "score": float(scores[index]), "reason": reason, "at": at})
        planes[plane] = {"axis": axis, "extent": list(extent), "slices": slices}
    return {"planes": planes}


def focus(uncertainty: np.ndarray, content: np.ndarray, reason: str = "uncertain") -> list[int]:
    """Where the views centre on a slice: an uncertain pick on its most uncertain voxel; a coverage pick — a look
    where the model may be wrong with confidence, which no uncertainty points to — on the middle of its image, as
    does a slice with no uncertainty."""
    if reason == "uncertain" and uncertainty.max() > 0:
        return [int(i) for i in np.unravel_index(int(uncertainty.argmax()), uncertainty.shape)]
    filled = np.argwhere(content) if content.any() else np.argwhere(np.ones_like(content))
    return [int(i) for i in np.round(filled.mean(0))]


def image_extent(holds_image) -> tuple[int, int]:
    """First and last slice that hold image (all slices when none does)."""
    filled = np.flatnonzero(holds_image)
    return (int(filled[0]), int(filled[-1])) if filled.size else (0, len(holds_image) - 1)


def ranked(scores, taken=(), extent=None) -> list[tuple[int, str]]:
    """(slice, reason) best first, for a user who has corrected the slices in `taken` already.

    Picks alternate, counting the corrected slices: "uncertain" — the highest-scoring slice, a pick (or corrected
    slice) deferring its neighbours within SUPPRESS behind every slice farther away — and "coverage" — the slice
    within `extent` (first, last; default: every slice) farthest from every pick, corrected slice and end. Ends when
    every slice in `extent` and every slice with a positive score is ranked."""
    scores = np.asarray(scores, dtype=float)
    first, last = extent if extent is not None else (0, len(scores) - 1)
    slices = np.arange(len(scores))
    # each slice's distance to the nearest pick, corrected slice or end (one past the extent on both sides)
    distance = np.where((slices >= first) & (slices <= last), np.minimum(slices - first + 1, last + 1 - slices), -1)
    deferred = np.zeros(len(scores), bool)
    candidates = np.argsort(-scores, kind="stable")
    uncertain = list(candidates[scores[candidates] > 0])
    order, count = [], 0

    def take(index: int) -> None:
        nonlocal count
        count += 1
        distance[index] = -1
        distance[:] = np.where(distance >= 0, np.minimum(distance, np.abs(slices - index)), -1)
        deferred[max(0, index - SUPPRESS):index + SUPPRESS + 1] = True
        if index in uncertain:
            uncertain.remove(index)

    for index in taken:
        take(int(index))
    while uncertain or distance.max() >= 0:
        if distance.max() >= 0 and (not uncertain or count % 2 == 1):
            index, reason = int(distance.argmax()), "coverage"
        else:
            index = next((i for i in uncertain if not deferred[i]), uncertain[0])
            index, reason = int(index), "uncertain"
        order.append((index, reason))
        take(index)
    return order


@dataclass
class Uncertainty:
    """Maps on the user's grid (x, y, z; a 2D model's plane) and the slice ranking of one prediction."""

    entropy: np.ndarray
    disagreement: np.ndarray | None
    ranking: dict
    #: voxels per class index (the model's label order): (base model's, adapted model's); empty without an adapter
    class_voxels: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: per class index: how much the adapter changes its mask (selection.class_distance); empty without an adapter
    class_change: dict[int, float] = field(default_factory=dict)

    @classmethod
    def measure(cls, probabilities: np.ndarray, label: np.ndarray, image: sitk.Image,
                base: np.ndarray | None = None, corrected: np.ndarray | None = None) -> "Uncertainty":
        """From the user-grid probabilities of the prediction (and of the base model, when an adapter is on);
        `corrected`: the voxels of this volume the user annotated already (its ranking skips those slices)."""
        from .selection import class_distance  # here: the Slicer panel imports this module without torch
        spread = entropy(probabilities)
        changed = disagreement(probabilities, base) if base is not None else None
        total = spread if changed is None else spread + changed
        # a 2D image, or a volume of one slice (a 2D model's plane of it), has no slices to rank: across its single
        # slice, every "slice" of another plane is a line of pixels
        volume = image.GetDimension() == 3 and 1 not in image.GetSize()
        shape = image.GetSize()
        ranking = rank_slices(total.reshape(shape), label.reshape(shape), image, corrected) if volume else \
            {"planes": {}}
        if base is None:
            return cls(spread, changed, ranking)
        adapted_index, base_index = probabilities.argmax(0), base.argmax(0)
        adapted_counts = np.bincount(adapted_index.ravel(), minlength=len(probabilities))
        base_counts = np.bincount(base_index.ravel(), minlength=len(base))
        counts = {index: (int(b), int(a)) for index, (b, a) in enumerate(zip(base_counts, adapted_counts))}
        return cls(spread, changed, ranking, counts, class_distance(adapted_index, base_index, len(base)))

    def write(self, prediction_path: Path, image: sitk.Image) -> dict[str, Path]:
        """Write the maps and the ranking beside the segmentation; returns their paths by kind."""
        from .data.io import write_image

        paths = companion_paths(prediction_path)
        write_image(on_grid_of(self.entropy, image), paths["uncertainty"])
        if self.disagreement is not None:
            write_image(on_grid_of(self.disagreement, image), paths["disagreement"])
        else:
            paths.pop("disagreement")
        paths["slices"].write_text(json.dumps(self.ranking) + "\n")
        return paths


def companion_paths(prediction_path: str | Path) -> dict[str, Path]:
    """Where the uncertainty files of a segmentation `<name>_seg<suffix>` lie (disagreement only with an adapter)."""
    path = Path(prediction_path)
    base = path.name[: -len(image_suffix(path))]
    base = base[: -len("_seg")] if base.endswith("_seg") else base
    suffix = map_suffix(path)
    return {"uncertainty": path.with_name(f"{base}_uncertainty{suffix}"),
            "disagreement": path.with_name(f"{base}_disagreement{suffix}"),
            "slices": path.with_name(f"{base}_slices.json")}


def predict_with_uncertainty(network, case, card, device: str = "cpu",
                             corrected: np.ndarray | None = None) -> tuple[sitk.Image, Uncertainty]:
    """The label image on the user's grid and its uncertainty; with adapter units on the network, the base model
    runs once more for the disagreement. `corrected`: see `Uncertainty.measure`."""
    from .adapters import iter_units
    from .inference import predict_probabilities, user_grid_prediction

    probabilities, values, label = user_grid_prediction(predict_probabilities(network, case.array, card, device),
                                                         case, card)
    base = None
    if any(record.active for record in iter_units(network)):
        with base_model(network):
            base = user_grid_prediction(predict_probabilities(network, case.array, card, device), case, card)[0]
    return label, Uncertainty.measure(probabilities, values, case.image, base, corrected)


@contextmanager
def base_model(network):
    """The network with every adapter unit gated off (the base model's forward), restored afterwards."""
    from .adapters import iter_units

    records = [(record, record.active) for record in iter_units(network)]
    for record, _ in records:
        record.owner.set_active(record.name, False)
    try:
        yield network
    finally:
        for record, active in records:
            record.owner.set_active(record.name, active)
