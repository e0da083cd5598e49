"""Whether an adapted state may replace the model the run started from: the audit's gain must exceed the audit's
own noise, and no audit case may get worse by more than a stated margin. Otherwise the starting model is kept,
and the run says so.

The noise is estimated from the audit volumes themselves. Each audit volume is cut into slabs along its last axis
(the sampling units); for every class, each slab contributes its overlap and its predicted and reference voxel
counts, and Dice is pooled over the slabs (defined even where a slab holds no foreground). The gain of a candidate
over the baseline is the difference of the pooled Dice on the same slabs; resampling the slabs with replacement
(a paired bootstrap) gives its distribution, and the gain counts as reliable when its lower confidence bound is
above zero, an exact sign-flip test over the slabs agrees, and the gain itself is at least `min_gain`. Classes absent
from an audit case's reference are not averaged in: an empty prediction is never rewarded.

Why both tests: a percentile bootstrap over few slabs claims more than it can. With three slabs, a candidate that
gains on each passes it, and under no effect at all that happens one time in eight, not one in twenty. The
sign-flip test is exact at any number of slabs: with n of them its smallest p is 2^-n, so fewer than five can never
show a gain at 95 %. A slab never splits the model planes copied from one acquired slice (a 7.5 mm slice on a 1 mm
grid is seven planes of one label): copies are one observation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.transforms import slice_runs

#: slabs per audit volume: the bootstrap's sampling units (fewer where the volume is thinner)
UNITS = 16
#: up to this many slabs in all, the sign-flip test enumerates every swap (2^n); above it, it samples them
EXACT_UNITS = 12
#: a flag is raised when the predicted foreground volume changes by more than this share while the gain is small
VOLUME_CHANGE = 0.3
#: a predicted volume is named for checking when the adapter changes a class there by more than this many times the
#: largest change it made on any audit case: the audit's verdict covers changes of the size it saw
BEYOND_AUDIT = 2.0
#: a change below this (Jaccard distance between the source's and the adapted mask) is never flagged: it moves the
#: class's Dice by about a point at most
MATERIAL_CHANGE = 0.02


@dataclass
class AuditCounts:
    """Per audit case: an array (slabs, classes, 3) of overlap, predicted and reference voxel counts per class."""

    cases: list[np.ndarray]

    @staticmethod
    def measure(prediction: np.ndarray, reference: np.ndarray, classes: int, units: int = UNITS,
                annotated: np.ndarray | None = None, layers: np.ndarray | None = None,
                bands_below: int = 2) -> np.ndarray:
        """Counts of one case from its predicted and reference class-index volumes (x, y, z) or images (x, y; the
        slabs are bands of rows). With `annotated` (a sparse reference) only those voxels count, and the slabs divide
        the annotated planes. `layers` (data.transforms.acquired_slices) keeps the planes copied from one acquired
        slice in one slab. When the slices are fewer than `bands_below`, the slabs run along the first axis instead,
        through them (one corrected slice still gives several units)."""
        if annotated is None:
            annotated = np.ones(prediction.shape, bool)
        across = tuple(range(prediction.ndim - 1))  # (x, y) of a volume, x of a 2D image's rows
        planes = np.flatnonzero(annotated.any(axis=across))
        slabs = unit_planes(planes, layers, units)
        if len(slabs) < bands_below:  # bands along the first axis
            prediction, reference, annotated = (np.moveaxis(a, 0, -1) for a in (prediction, reference, annotated))
            slabs = unit_planes(np.flatnonzero(annotated.any(axis=across)), None, units)
        counts = np.zeros((len(slabs), classes - 1, 3), dtype=np.int64)
        for u, where in enumerate(slabs):
            p, r, m = prediction[..., where], reference[..., where], annotated[..., where]
            for c in range(1, classes):
                pc, rc = (p == c) & m, (r == c) & m
                counts[u, c - 1] = (np.count_nonzero(pc & rc), np.count_nonzero(pc), np.count_nonzero(rc))
        return counts

    def case_dice(self) -> list[float]:
        return [float(pooled_dice(counts.sum(0))) for counts in self.cases]

    def dice(self) -> float:
        """Mean over cases of the mean over their present classes."""
        return float(np.mean(self.case_dice()))

    def class_dice(self) -> list[float | None]:
        """Dice of every foreground class over all audit cases together (None: absent from every reference)."""
        overlap, predicted, reference = np.sum([c.sum(0) for c in self.cases], axis=0).T
        return [float(2 * o / (p + r)) if r else None for o, p, r in zip(overlap, predicted, reference)]

    def foreground(self) -> int:
        return int(sum(counts[..., 1].sum() for counts in self.cases))

    def to_state(self) -> list[torch.Tensor]:
        return [torch.from_numpy(c) for c in self.cases]

    @classmethod
    def from_state(cls, state: Sequence[torch.Tensor]) -> "AuditCounts":
        return cls([t.numpy() for t in state])


def unit_planes(planes: np.ndarray, layers: np.ndarray | None, units: int = UNITS) -> list[np.ndarray]:
    """The audit's sampling units: up to `units` runs of the annotated `planes`, each of whole acquired slices
    (`layers`: per plane, the slice it was copied from; None: every plane its own)."""
    groups = slice_runs(planes, layers)
    edges = np.linspace(0, len(groups), min(units, len(groups)) + 1).round().astype(int)
    return [np.concatenate(groups[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def class_distance(adapted: np.ndarray, base: np.ndarray, classes: int,
                   where: np.ndarray | None = None) -> dict[int, float]:
    """Per foreground class index that either class-index map holds (within `where`): the Jaccard distance between
    the two masks, 0 for the same voxels, 1 for none in common."""
    if where is not None:
        adapted, base = adapted[where], base[where]
    distances = {}
    for c in range(1, classes):
        a, b = adapted == c, base == c
        union = np.count_nonzero(a | b)
        if union:
            distances[c] = float(np.count_nonzero(a ^ b) / union)
    return distances


def beyond_audit(distance: float, audit: float) -> bool:
    """Whether a change on a volume the audit never saw is larger than what the audit vouched for."""
    return distance > MATERIAL_CHANGE and distance > BEYOND_AUDIT * audit


def pooled_dice(counts: np.ndarray):
    """Mean Dice over the classes present in the reference, from summed (..., classes, 3) counts (0 where no class
    is present); leading axes are kept."""
    overlap, predicted, reference = counts[..., 0], counts[..., 1], counts[..., 2]
    present = reference > 0
    dice = np.where(present, 2 * overlap / np.maximum(predicted + reference, 1), 0.0)
    found = present.sum(-1)
    return np.where(found > 0, dice.sum(-1) / np.maximum(found, 1), 0.0)


@dataclass
class Verdict:
    gain: float  # audit Dice of the candidate minus the baseline's
    low: float  # lower confidence bound of the gain
    high: float
    worst_case: float  # the largest drop of any one audit case (negative: a case got worse)
    p_value: float  # of the sign-flip test: how often swapping the two states slab by slab gains as much
    reliable: bool
    flag: str = ""  # a warning worth showing even when the state is not chosen

    def fields(self) -> dict:
        return {"gain": self.gain, "gain_low": self.low, "gain_high": self.high, "worst_case": self.worst_case,
                "p_value": self.p_value, "reliable": self.reliable, **({"flag": self.flag} if self.flag else {})}


@dataclass
class SelectionRule:
    min_gain: float = 0.005  # Dice: smaller gains are not worth a changed model
    case_margin: float = 0.01  # Dice: no audit case may get worse by more
    confidence: float = 0.95  # one-sided, of the lower bound
    resamples: int = 2000
    seed: int = 0

    def judge(self, candidate: AuditCounts, baseline: AuditCounts) -> Verdict:
        gain = candidate.dice() - baseline.dice()
        low, high = self._bounds(candidate, baseline)
        worst = min(c - b for c, b in zip(candidate.case_dice(), baseline.case_dice()))
        p = self._p_value(candidate, baseline)
        reliable = low > 0 and p <= 1 - self.confidence and gain >= self.min_gain and worst >= -self.case_margin
        flag = ""
        volume, base_volume = candidate.foreground(), baseline.foreground()
        if base_volume and abs(volume / base_volume - 1) > VOLUME_CHANGE and gain < 4 * self.min_gain:
            flag = (f"predicted foreground changed by {100 * (volume / base_volume - 1):+.0f} % on the audit volumes "
                    f"for an audit gain of {100 * gain:+.1f} Dice points")
        return Verdict(gain, low, high, worst, p, reliable, flag)

    def fewest_units(self) -> int:
        """Slabs an audit needs before any gain can pass the sign-flip test: with n its smallest p is 2^-n."""
        return math.ceil(math.log2(1 / (1 - self.confidence)) - 1e-9)

    def _p_value(self, candidate: AuditCounts, baseline: AuditCounts) -> float:
        """One-sided p of the gain if the two states were exchangeable on every slab: the share of the ways of
        swapping them slab by slab (every one for up to EXACT_UNITS slabs, else `resamples` random ones beside the
        observed) whose gain is at least the observed one."""
        n = sum(len(c) for c in candidate.cases)
        if n <= EXACT_UNITS:
            swaps = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1 == 1  # row 0: no swap, the observed gain
        else:
            rng = np.random.default_rng(self.seed)
            swaps = np.vstack([np.zeros((1, n), bool), rng.random((self.resamples, n)) < 0.5])
        gains, first = np.zeros(len(swaps)), 0
        for c, b in zip(candidate.cases, baseline.cases):
            swapped = swaps[:, first:first + len(c), None, None]
            first += len(c)
            gains += pooled_dice(np.where(swapped, b, c).sum(1)) - pooled_dice(np.where(swapped, c, b).sum(1))
        return float(np.mean(gains >= gains[0] - 1e-12))

    def _bounds(self, candidate: AuditCounts, baseline: AuditCounts) -> tuple[float, float]:
        """Paired bootstrap over the slabs of every audit case (each case resampled within itself)."""
        rng = np.random.default_rng(self.seed)
        gains = np.zeros(self.resamples)
        for c, b in zip(candidate.cases, baseline.cases):
            pick = rng.integers(len(c), size=(self.resamples, len(c)))
            gains += pooled_dice(c[pick].sum(1)) - pooled_dice(b[pick].sum(1))
        gains /= len(candidate.cases)
        tail = 1 - self.confidence
        return float(np.quantile(gains, tail)), float(np.quantile(gains, 1 - tail))
