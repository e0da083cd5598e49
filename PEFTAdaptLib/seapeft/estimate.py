"""Utility of a unit that has never trained: a calibrated first-order estimate instead of the reference's 0.

Every pool unit starts as an exact identity (LoRA/ConvLoRA B = 0, SALT Y = 0 with a = 1, b = 0, AdaptFormer
up = 0, BitFit δ = 0, norm-affine = the layer's own γ, β). Toggling it on therefore changes nothing, and the
reference scored it exactly 0 — such a unit could never enter (peft-methods.md §1(l) Q2). What toggling cannot
see, the gradient can: with every untrained unit switched on the output is unchanged, so one backward pass of the
audit soft Dice D gives each unit's gradient g at no extra forward cost. AdamW moves each parameter by about η per
step along −sign(g) early on (m/√v ≈ ±1), so k steps of training buy, to first order,

    ΔD ≈ η · k · ‖g‖₁.

That is optimistic (curvature, the gradient shrinks as other units fit), so it is multiplied by a calibration
factor c learned from the audits themselves: whenever a unit that entered on an estimate is first measured by
toggling, the pair (predicted, measured) is kept, and c is the median measured/predicted ratio of the recent pairs,
clipped to `bounds`. Estimates and toggle measurements are thus on one scale, and the knapsack can trade an
untrained unit against a trained one.
"""
from __future__ import annotations

import statistics
from collections import deque


def first_order_gain(gradient_l1: float, lr: float, horizon: int) -> float:
    """ΔDice of `horizon` Adam steps at learning rate `lr` for a unit whose gradient has L1 norm `gradient_l1`."""
    return lr * horizon * gradient_l1


class Calibration:
    def __init__(self, window: int = 16, bounds: tuple[float, float] = (0.02, 1.0), initial: float = 1.0):
        self.window, self.bounds, self.initial = window, tuple(bounds), initial
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, predicted: float, measured: float) -> None:
        if predicted > 0:
            self.pairs.append((float(predicted), float(measured)))

    @property
    def factor(self) -> float:
        if not self.pairs:
            return self.initial
        ratio = statistics.median(m / p for p, m in self.pairs)
        low, high = self.bounds
        return min(max(ratio, low), high)

    def state_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs]}

    def load_state_dict(self, state: dict) -> None:
        self.pairs = deque((tuple(p) for p in state["pairs"]), maxlen=self.window)


class FamilyCalibration:
    """One calibration per unit family, and the pooled pairs of all families for a family not yet measured.

    Why per family: the ratio realised/first-order differs by two orders of magnitude between families (spine
    T2 → T1, every pool unit trained alone for 40 steps: median 9 for LoRA, 2 for ConvLoRA, 0.6 for SALT, 0.2 for
    dense deltas, 0.1 for norm-affine; docs/seapeft.md). A LoRA unit starts with B = 0, so its A factor has no
    gradient and the estimate sees half of what trains; a dense delta's estimate is linear in a layer's worth of
    weights and saturates. One shared factor fits neither and, pulled down by the first dense pairs, shut every
    other family out."""

    def __init__(self, window: int = 16, bounds: tuple[float, float] = (0.02, 1.0)):
        self.window, self.bounds = window, tuple(bounds)
        self.pooled = Calibration(window, bounds)
        self.families: dict[str, Calibration] = {}

    def add(self, family: str, predicted: float, measured: float) -> None:
        self.families.setdefault(family, Calibration(self.window, self.bounds)).add(predicted, measured)
        self.pooled.add(predicted, measured)

    def factor(self, family: str) -> float:
        own = self.families.get(family)
        return own.factor if own is not None and own.pairs else self.pooled.factor

    def factors(self) -> dict[str, float]:
        return {"*": self.pooled.factor, **{f: self.factor(f) for f in sorted(self.families)}}

    def state_dict(self) -> dict:
        return {"pooled": self.pooled.state_dict(), "families": {f: c.state_dict() for f, c in self.families.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pooled.load_state_dict(state["pooled"])
        self.families = {}
        for family, values in state["families"].items():
            self.families[family] = Calibration(self.window, self.bounds)
            self.families[family].load_state_dict(values)
