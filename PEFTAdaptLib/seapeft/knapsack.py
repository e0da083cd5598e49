"""Budgeted selection of adapter units: a multiple-choice knapsack (at most one variant per (site, family)).

The reference allocator is a greedy pass by value density that admits active units over the budget and repairs
afterwards. Here the budget is binding and the selection maximises the total predicted Dice gain
Σ gain_u = Σ value_u · cost_u / 1000 (values are utilities per 1000 parameters):

- guarded ("locked") active units are kept first; guarded inactive units stay out;
- an active unit gets a hysteresis bonus of `hysteresis` Dice, so it is replaced only by a set better by more than
  that; an inactive unit needs a positive gain to enter;
- the greedy pass (best density first, the reference's rule) and an exact dynamic programme over the budget (costs
  rounded *up* to a quantum, so never infeasible; exact whenever the budget has ≤ `cells` parameters) are both
  solved and the better set is returned, so the result is never worse than greedy and optimal on small pools.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PER = 1000.0  # utilities are Dice per 1000 parameters


@dataclass(frozen=True)
class Candidate:
    name: str
    key: tuple[str, str]  # (site, family): at most one variant per key
    cost: int
    value: float  # utility per 1000 parameters (score + exploration bonus)
    active: bool = False
    locked: bool = False  # inside its guard: an active one must stay, an inactive one must stay out

    @property
    def gain(self) -> float:
        return self.value * self.cost / PER


def _effective(c: Candidate, hysteresis: float) -> float:
    return c.gain + (hysteresis if c.active else 0.0)


def greedy(candidates: Sequence[Candidate], capacity: int, hysteresis: float = 0.0,
           taken: set[tuple[str, str]] | None = None) -> list[Candidate]:
    """Best effective gain per parameter first, one per key, within `capacity`."""
    taken = set(taken or ())
    chosen, used = [], 0
    order = sorted(candidates, key=lambda c: (-_effective(c, hysteresis) / max(c.cost, 1), not c.active, c.name))
    for c in order:
        if c.key in taken or _effective(c, hysteresis) <= 0 or used + c.cost > capacity:
            continue
        chosen.append(c)
        used += c.cost
        taken.add(c.key)
    return chosen


def exact(candidates: Sequence[Candidate], capacity: int, hysteresis: float = 0.0, cells: int = 4096) -> list[Candidate]:
    """Multiple-choice knapsack by dynamic programming over the budget, costs rounded up to capacity/cells."""
    if capacity <= 0:
        return []
    quantum = max(1, math.ceil(capacity / cells))
    slots = capacity // quantum
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (not c.active, c.name)):
        if _effective(c, hysteresis) > 0 and c.cost <= capacity:
            groups.setdefault(c.key, []).append(c)
    keys = sorted(groups)
    best = np.zeros(slots + 1)
    choices = np.full((len(keys), slots + 1), -1, dtype=np.int32)
    for g, key in enumerate(keys):
        new = best.copy()
        for j, c in enumerate(groups[key]):
            size = math.ceil(c.cost / quantum)
            if size > slots:
                continue
            trial = best[: slots + 1 - size] + _effective(c, hysteresis)
            better = trial > new[size:] + 1e-15
            new[size:][better] = trial[better]
            choices[g, size:][better] = j
        best = new
    chosen, room = [], slots
    for g in reversed(range(len(keys))):
        j = choices[g, room]
        if j >= 0:
            c = groups[keys[g]][j]
            chosen.append(c)
            room -= math.ceil(c.cost / quantum)
    return chosen


def allocate(candidates: Sequence[Candidate], budget: int, hysteresis: float = 0.0) -> set[str]:
    """The desired active set: locked units, then the better of the greedy and the exact selection."""
    kept = [c for c in candidates if c.locked and c.active]
    used = sum(c.cost for c in kept)
    if used > budget:  # cannot happen while the controller admits within the budget; keep the best that fit
        kept = greedy(kept, budget, float("inf"))
        used = sum(c.cost for c in kept)
    taken = {c.key for c in kept}
    free = [c for c in candidates if not c.locked and c.key not in taken]
    capacity = budget - used
    options = [greedy(free, capacity, hysteresis), exact(free, capacity, hysteresis)]
    total = [sum(_effective(c, hysteresis) for c in option) for option in options]
    best = options[1] if total[1] >= total[0] - 1e-12 else options[0]
    return {c.name for c in kept} | {c.name for c in best}
