"""Finite-state controller with votes and guards: a unit flips only after `votes` consecutive allocations asking
for it, then stays put for `guard` allocations (no flip, no votes), which stops the allocation from oscillating.

    INACTIVE --desired×votes--> ACTIVE(guarded) --guard rounds--> ACTIVE --undesired×votes--> INACTIVE(guarded) ...
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UnitState:
    active: bool = False
    guard: int = 0
    promote_votes: int = 0
    demote_votes: int = 0

    @property
    def label(self) -> str:
        if self.guard > 0:
            return "active (guarded)" if self.active else "inactive (guarded)"
        if self.active:
            return "demoting" if self.demote_votes else "active"
        return "promoting" if self.promote_votes else "inactive"


class Controller:
    def __init__(self, names, votes: int = 2, guard: int = 2):
        self.votes, self.guard = votes, guard
        self.units = {name: UnitState() for name in names}

    def apply(self, desired: set[str]) -> dict[str, bool]:
        """Advance one allocation round; returns the units that flipped (name → new active state)."""
        flips = {}
        for name, state in self.units.items():
            want = name in desired
            if state.guard > 0:
                state.guard -= 1
                continue
            if want == state.active:
                state.promote_votes = state.demote_votes = 0
                continue
            if want:
                state.promote_votes, state.demote_votes = state.promote_votes + 1, 0
            else:
                state.demote_votes, state.promote_votes = state.demote_votes + 1, 0
            if max(state.promote_votes, state.demote_votes) >= self.votes:
                state.active = want
                state.guard = self.guard
                state.promote_votes = state.demote_votes = 0
                flips[name] = want
        return flips

    def force(self, name: str, active: bool) -> None:
        """Budget repair: switch a unit regardless of its guard."""
        state = self.units[name]
        state.active, state.guard, state.promote_votes, state.demote_votes = active, self.guard, 0, 0

    def state_dict(self) -> dict:
        return {name: vars(state).copy() for name, state in self.units.items()}

    def load_state_dict(self, state: dict) -> None:
        self.units = {name: UnitState(**values) for name, values in state.items()}
