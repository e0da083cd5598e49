"""Finite-state controller: turns the knapsack's desired set into gate flips, slowly and within the budget.

States per unit (docs/seapeft.md draws the diagram):

    inactive ──desired──▶ promoting ──desired, votes reached, fits the budget──▶ active_guard ──guard rounds──▶ active
    active ──not desired──▶ demoting ──not desired, votes reached──▶ inactive_guard ──guard rounds──▶ inactive
    promoting ──not desired──▶ inactive          demoting ──desired──▶ active

- votes: a flip needs `votes` consecutive allocation rounds asking for it (temporal hysteresis);
- guard: after a flip the unit neither flips nor collects votes for `guard` rounds (no oscillation);
- admission: demotions are applied first, then promotions in priority order while the budget holds; a promotion
  that does not fit waits in `promoting` — so the active set never exceeds the budget and no guard is ever broken
  to repair it (the reference admitted active units over budget and repaired afterwards).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

INACTIVE, PROMOTING, ACTIVE_GUARD, ACTIVE, DEMOTING, INACTIVE_GUARD = (
    "inactive", "promoting", "active_guard", "active", "demoting", "inactive_guard")


@dataclass
class UnitState:
    active: bool = False
    guard: int = 0
    votes: int = 0  # consecutive rounds asking for the opposite of `active`

    @property
    def label(self) -> str:
        if self.guard > 0:
            return ACTIVE_GUARD if self.active else INACTIVE_GUARD
        if self.votes:
            return DEMOTING if self.active else PROMOTING
        return ACTIVE if self.active else INACTIVE


class Controller:
    def __init__(self, names, votes: int = 2, guard: int = 2):
        self.votes, self.guard = votes, guard
        self.units = {name: UnitState() for name in names}

    def active(self) -> set[str]:
        return {n for n, s in self.units.items() if s.active}

    def locked(self, name: str) -> bool:
        return self.units[name].guard > 0

    def start(self, names, guard: int) -> dict[str, bool]:
        """The first allocation: switch `names` on at once (no history to vote on), guarded for `guard` rounds."""
        flips = {}
        for name in names:
            state = self.units[name]
            if not state.active:
                state.active, state.guard, state.votes = True, guard, 0
                flips[name] = True
        return flips

    def apply(self, desired: set[str], costs: Mapping[str, int], budget: int,
              priority: Mapping[str, float] | None = None, keys: Mapping[str, tuple] | None = None) -> dict[str, bool]:
        """Advance one allocation round; returns the units that flipped (name → new gate). With `keys`, a promotion
        waits while another unit of its (site, family) key is still active."""
        priority = priority or {}
        ready_on, ready_off = [], []
        for name, state in self.units.items():
            if state.guard > 0:
                state.guard -= 1
                continue
            if (name in desired) == state.active:
                state.votes = 0
                continue
            state.votes = min(state.votes + 1, self.votes)
            if state.votes >= self.votes:
                (ready_off if state.active else ready_on).append(name)
        flips: dict[str, bool] = {}
        for name in ready_off:
            self._flip(name, False)
            flips[name] = False
        used = sum(costs[n] for n, s in self.units.items() if s.active)
        occupied = {keys[n] for n, s in self.units.items() if s.active} if keys else set()
        for name in sorted(ready_on, key=lambda n: (-priority.get(n, 0.0), n)):
            if keys and keys[name] in occupied:
                continue
            if used + costs[name] <= budget:
                if keys:
                    occupied.add(keys[name])
                self._flip(name, True)
                used += costs[name]
                flips[name] = True
        return flips

    def finish(self, names) -> None:
        """Terminal state after the final configuration sweep: exactly `names` active, no guards, no votes."""
        names = set(names)
        for name, state in self.units.items():
            state.active, state.guard, state.votes = name in names, 0, 0

    def _flip(self, name: str, active: bool) -> None:
        state = self.units[name]
        state.active, state.guard, state.votes = active, self.guard, 0

    def state_dict(self) -> dict:
        return {name: asdict(state) for name, state in self.units.items()}

    def load_state_dict(self, state: dict) -> None:
        self.units = {name: UnitState(**values) for name, values in state.items()}
