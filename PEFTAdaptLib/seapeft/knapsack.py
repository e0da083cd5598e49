"""Greedy knapsack over adapter units: best value first, one variant per (site, family), a binding budget."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    key: tuple[str, str]  # (site, family): at most one variant of a family per site
    cost: int
    value: float  # utility per parameter (+ exploration bonus)
    active: bool = False
    locked: bool = False  # inside its guard: kept if it fits


def allocate(candidates: Sequence[Candidate], budget: int, hysteresis: float = 0.0) -> set[str]:
    """The desired active set.

    Locked units first (as long as they fit), then representatives of each (site, family) by value: inactive units
    need value > 0 to enter, active units are kept down to value ≥ −hysteresis. Unlike the reference allocator,
    nothing is admitted over the budget — the budget is binding.
    """
    chosen: set[str] = set()
    used = 0
    taken_keys: set[tuple[str, str]] = set()
    for c in sorted((c for c in candidates if c.locked), key=lambda c: -c.value):
        if used + c.cost <= budget and c.key not in taken_keys:
            chosen.add(c.name)
            used += c.cost
            taken_keys.add(c.key)
    best: dict[tuple[str, str], Candidate] = {}
    for c in candidates:
        if c.key in taken_keys or c.cost <= 0:
            continue
        incumbent = best.get(c.key)
        if incumbent is None or (c.value, c.active) > (incumbent.value, incumbent.active):
            best[c.key] = c
    for c in sorted(best.values(), key=lambda c: -c.value):
        keep = c.value >= -hysteresis if c.active else c.value > 0
        if keep and used + c.cost <= budget:
            chosen.add(c.name)
            used += c.cost
    return chosen
