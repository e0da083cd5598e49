"""What an adapter's audit vouches for, and which predicted volumes it does not (docs/selection.md).

The selection rule judges a state on the audit volumes only. A predicted volume is named for checking, in one line
with every reason (`volume_warning`), when the adapter changes it more than the audit saw (`changed_classes`), and,
when the audit was only slabs of the training scans (held out by the job, or given as audit volumes cut from the same
scan: `same_scan_caveat`), or was one volume (`one_volume_caveat`), whenever it is not one of the training or audit
volumes (`outside_cover`): a slab of one subject, or one 2D image of another patient, vouched for gains that did not
carry over to other subjects, or to a farther slab of the same one, more than once. Both records travel in the
adapter's metadata, so a later predict job with the adapter names the same volumes.
Adapters are untrusted data: a malformed record is one line naming the file.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data.cases import Case
from .data.io import volume_digest
from .errors import ModelError
from .models.card import ModelCard
from .selection import BEYOND_AUDIT, VOLUME_CHANGE, beyond_audit
from .uncertainty import Uncertainty

#: adapter metadata: per class index, the largest change the adapter made on an audit case (training.audit_change)
AUDIT_CHANGE = "audit_change"
#: adapter metadata: true when the adapter is the source model itself (holds_the_source)
SOURCE_KEPT = "source_kept"

#: what every caveat below asks of the user: a gain shown on one subject's volumes says nothing of its spread between
#: subjects
ASK_FOR_SUBJECTS = ("check the predictions of other volumes, or give annotated volumes of two or more other subjects "
                    "as the audit")
#: what a job held out of its training volumes as the audit, by the kind of record data/holdout.py gives
HELD_OUT = {"slab": "a held-out slab", "slices": "held-out corrected slices",
            "within": "a held-out strip of a corrected slice"}


def same_volume_audit(held: Sequence[dict] = (), shown: str = "gain") -> str:
    """Said when the state kept was judged on parts of the training volumes only (`held`: the `audit_held_out`
    records, worded by what they held out): their gain need not carry over to other subjects (docs/benchmarks.md shows
    it did not, more than once). `shown`: what the audit measured, its "Dice" where no source model compares."""
    kinds = dict.fromkeys("within" if "within" in r else "slices" if "slices" in r else "slab" for r in held)
    return (f"the audit was {' and '.join(HELD_OUT[k] for k in kinds or ['slab'])} of the training volume(s), so its "
            f"{shown} is shown on those volumes only: {ASK_FOR_SUBJECTS}")


#: adapter metadata, present when the audit was slabs of the training scans or one volume: the digests of the training
#: and audit volumes (`volume_digest`), the only ones the audit's gain speaks for
AUDIT_COVERS = "audit_covers"


def volume_warning(name: str, image: sitk.Image, measured: Uncertainty, card: ModelCard,
                   checked: dict[int, float] | None = None, covers: list[str] | None = None) -> str | None:
    """One line naming a predicted volume the audit cannot vouch for, with every reason, or None when it can."""
    reasons = changed_classes(measured, card, checked) + outside_cover(image, covers)
    if not reasons:
        return None
    return (f"{name}: {'; '.join(reasons)}; the audit cannot vouch for this volume: check it (its disagreement map "
            "shows where)")


def changed_classes(measured: Uncertainty, card: ModelCard, checked: dict[int, float] | None = None) -> list[str]:
    """Classes whose segmentation the adapter changes a lot against the source model's, or more than it changed any
    audit case (`checked`, per class index): the audit's verdict may not hold there (a held-out slab cannot see every
    region)."""
    reasons = []
    for index, (base, adapted) in measured.class_voxels.items():
        label = card.labels[index]
        if label.value == 0 or max(base, adapted) == 0:
            continue
        distance, vouched = measured.class_change.get(index, 0.0), (checked or {}).get(index, 0.0)
        if abs(adapted - base) > VOLUME_CHANGE * max(base, 1):
            change = (f"by {100 * (adapted / base - 1):+.0f} %" if base else
                      f"with {adapted:,} voxels where it found none")
            reasons.append(f"the adapted model's {label.name} differs from the source model's {change}")
        elif checked is not None and beyond_audit(distance, vouched):
            reasons.append(f"the adapted model changes {100 * distance:.0f} % of the voxels either model calls "
                           f"{label.name}, more than {BEYOND_AUDIT:g}× the {100 * vouched:.0f} % it changed on the "
                           "audit")
    return reasons


def outside_cover(image: sitk.Image, covers: list[str] | None) -> list[str]:
    """The reason, when the audit covers only other volumes (`covers`: digests; None: the audit was two or more scans
    of their own, or the adapter predates the record)."""
    if covers is None or volume_digest(image) in covers:
        return []
    return ["the adapter's audit covers only the volume(s) it was trained and audited on, and this is another volume"]


def same_scan_caveat(support: list[Case], audit: list[Case], shown: str = "gain") -> str | None:
    """What to say when an audit volume was cut from the scan of a training volume (a neighbouring slab): its gain,
    like a held-out slab's, is shown on that scan only. None when every audit volume is a scan of its own."""
    pairs = [(a.name, s.name) for a in audit for s in support if cut_from_one_scan(s.image, a.image)]
    if not pairs:
        return None
    named = ", ".join(f"{a} from {s}" for a, s in pairs)
    return (f"the audit volume(s) were cut from the scan(s) of training volume(s) ({named}), so the {shown} is shown "
            f"on those scans only: {ASK_FOR_SUBJECTS}")


def one_volume_caveat(audit: list[Case], shown: str = "gain") -> str | None:
    """What to say when the audit is a single volume: a gain on one subject's scan (or one 2D image) gives no measure
    of how it varies between subjects, so it is shown on that volume only. None with two or more audit volumes."""
    if len(audit) != 1:
        return None
    return f"the audit is one volume ({audit[0].name}), so its {shown} is shown on that volume only: {ASK_FOR_SUBJECTS}"


def cut_from_one_scan(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two volumes are crops of one scan: they lie on one voxel grid and are either slabs side by side along
    one axis (overlapping along the others) or overlap with the same voxels. Two subjects resampled onto one
    template grid overlap with different voxels, and are not."""
    if (a.GetDimension() != b.GetDimension() or not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4)
            or not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)):
        return False
    offset = np.array(a.TransformPhysicalPointToContinuousIndex(b.GetOrigin()))
    if not np.allclose(offset, np.round(offset), atol=1e-3):  # grids shifted by a fraction of a voxel
        return False
    start = np.round(offset).astype(int)
    low, high = np.maximum(start, 0), np.minimum(start + b.GetSize(), a.GetSize())
    apart = high <= low  # per axis (x, y, z): no overlap
    if apart.any():
        return int(apart.sum()) == 1
    in_a = tuple(slice(lo, hi) for lo, hi in zip(low[::-1], high[::-1]))  # array order is (z, y, x)
    in_b = tuple(slice(lo, hi) for lo, hi in zip((low - start)[::-1], (high - start)[::-1]))
    overlap_a = sitk.GetArrayViewFromImage(a)[in_a].astype(np.float64)
    overlap_b = sitk.GetArrayViewFromImage(b)[in_b].astype(np.float64)
    return bool(np.allclose(overlap_a, overlap_b, rtol=1e-5, atol=1e-6))


def audit_change_of(config: dict, folder: Path, card: ModelCard) -> dict[int, float] | None:
    """The audit change an adapter (its loaded `config`) was saved with; absent from adapters of earlier versions
    and runs without an audit. Untrusted data: a malformed entry is one line naming the file."""
    metadata = config.get("metadata")
    saved = metadata.get(AUDIT_CHANGE) if isinstance(metadata, dict) else None
    if saved is None:
        return None
    try:
        checked = {int(i): float(d) for i, d in saved.items()}
        valid = all(0 < i < card.num_classes and 0 <= d <= 1 for i, d in checked.items())
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ModelError(f"{folder}: metadata field '{AUDIT_CHANGE}' must map class indices of this model to "
                         "changes between 0 and 1")
    return checked


def holds_the_source(config: dict) -> bool:
    """Whether an adapter (its loaded `config`) is the source model itself: its run kept its start, and started from
    the source (not an earlier adapter, nor AdaBN statistics); a segmentation with it is the source model's."""
    metadata = config.get("metadata")
    return isinstance(metadata, dict) and metadata.get(SOURCE_KEPT) is True


def audit_covers_of(config: dict, folder: Path) -> list[str] | None:
    """The `AUDIT_COVERS` record an adapter (its loaded `config`) was saved with, if any."""
    metadata = config.get("metadata")
    saved = metadata.get(AUDIT_COVERS) if isinstance(metadata, dict) else None
    if saved is None:
        return None
    if not (isinstance(saved, list) and all(isinstance(d, str) and re.fullmatch("[0-9a-f]{64}", d) for d in saved)):
        raise ModelError(f"{folder}: metadata field '{AUDIT_COVERS}' must list volume digests (64 hex digits each)")
    return saved

