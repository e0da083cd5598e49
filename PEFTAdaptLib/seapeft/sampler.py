"""Which units an audit toggles (reference `sea_peft/sampler.py`, with its unused coverage target dropped).

Only units that have trained can be measured by toggling (an untrained one is an identity: see estimate.py).
Slots, in order: units unprobed for ≥ `debt_horizon` audits (forced, shuffled; a newly trained unit is overdue at
once, so it is measured at the next audit); then `active_share` of the rest to active units and the remainder to
trained inactive ones (shortfalls spill over); within a pool, uniform for the first `uniform_audits` audits, then
half to the least-probed units and half to the most uncertain.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class AuditSampler:
    def __init__(self, k: int, active_share: float = 0.75, debt_horizon: int = 4, uniform_audits: int = 2,
                 seed: int = 0):
        self.k, self.active_share, self.debt_horizon, self.uniform_audits = k, active_share, debt_horizon, uniform_audits
        self.rng = np.random.default_rng(seed)
        self.audits = 0

    def _pick(self, pool: list[str], quota: int, probes: Mapping[str, int], last: Mapping[str, int],
              uncertainty: Mapping[str, float]) -> list[str]:
        if quota <= 0 or not pool:
            return []
        if quota >= len(pool):
            return list(pool)
        if self.audits <= self.uniform_audits:
            return [pool[i] for i in sorted(self.rng.choice(len(pool), quota, replace=False))]
        fewest = sorted(pool, key=lambda n: (probes.get(n, 0), last.get(n, 0), n))[: max(1, quota // 2)]
        rest = [n for n in pool if n not in fewest]
        uncertain = sorted(rest, key=lambda n: (-uncertainty.get(n, 0.0), n))[: quota - len(fewest)]
        return fewest + uncertain

    def sample(self, measurable: Sequence[str], active: set[str], probes: Mapping[str, int],
               last: Mapping[str, int], uncertainty: Mapping[str, float]) -> list[str]:
        """The units to toggle at this audit; `last` maps a unit to the audit number it was last probed at."""
        self.audits += 1
        now = self.audits
        measurable = sorted(measurable)
        overdue = [n for n in measurable if now - last.get(n, 0) >= self.debt_horizon]
        order = self.rng.permutation(len(overdue)) if overdue else []
        chosen = [overdue[i] for i in order][: self.k]
        room = self.k - len(chosen)
        on = [n for n in measurable if n in active and n not in chosen]
        off = [n for n in measurable if n not in active and n not in chosen]
        quota_on = min(len(on), int(round(self.active_share * room)))
        quota_off = min(len(off), room - quota_on)
        quota_on = min(len(on), room - quota_off)  # spill the inactive shortfall back to the active pool
        chosen += self._pick(on, quota_on, probes, last, uncertainty)
        chosen += self._pick(off, quota_off, probes, last, uncertainty)
        return chosen

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "audits": self.audits}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.audits = state["audits"]
