"""The allocator's bookkeeping, without torch: what each unit is worth, which units to audit, which to switch,
and the events the GUI shows. `hook.py` feeds it measurements from the network; tests drive it with synthetic
utilities.

Evidence per unit: first-order estimates while it has never trained (calibrated, estimate.py), toggle measurements
once it has (its utility is reset at the switch, so the two kinds are never averaged). Utilities are Dice per 1000
parameters, smoothed by EMA + IQR (utility.py). Every allocation round solves the knapsack (knapsack.py) and the
controller (controller.py) turns the desired set into flips.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from .config import SeaPeftConfig
from .controller import Controller
from .estimate import FamilyCalibration
from .knapsack import PER, Candidate, allocate
from .pool import PoolUnit
from .sampler import AuditSampler
from .utility import RobustUtility

NONE, FIRST_ORDER, TOGGLE = "none", "first_order", "toggle"


class Allocator:
    def __init__(self, pool: Sequence[PoolUnit], config: SeaPeftConfig):
        self.pool, self.config = list(pool), config
        self.units = {u.name: u for u in self.pool}
        self.utilities = {n: RobustUtility(config.beta, config.window, config.iqr_weight) for n in self.units}
        self.source = dict.fromkeys(self.units, NONE)
        self.predicted: dict[str, float] = {}  # last uncalibrated first-order ΔDice of an untrained unit
        self.trained: set[str] = set()
        self.probes = dict.fromkeys(self.units, 0)
        self.last_probe = dict.fromkeys(self.units, 0)
        self.controller = Controller(list(self.units), config.votes, config.guard)
        self.sampler = AuditSampler(config.audit_units, config.active_share, config.debt_horizon,
                                    config.uniform_audits, config.seed)
        self.calibration = FamilyCalibration(config.calibration_window, config.calibration_bounds)
        self.history: deque[list[str]] = deque(maxlen=config.history)
        self.rounds = 0

    # -- state of the pool -------------------------------------------------------------------------------------------
    def active(self) -> set[str]:
        return self.controller.active()

    def budget_used(self, names=None) -> int:
        return sum(self.units[n].cost for n in (self.active() if names is None else names))

    def value(self, name: str) -> float:
        utility = self.utilities[name]
        return utility.score + self.config.exploration * utility.uncertainty

    def fresh(self) -> list[str]:
        """Units that have never trained: measured by first-order estimates."""
        return [n for n in self.units if n not in self.trained]

    def mark_trained(self) -> None:
        self.trained |= self.active()

    # -- evidence ----------------------------------------------------------------------------------------------------
    def observe_estimate(self, name: str, raw_gain: float, base_dice: float) -> float:
        """Record an untrained unit's first-order ΔDice (`raw_gain` = η·k·‖g‖₁); returns the calibrated gain."""
        if name in self.trained:
            raise ValueError(f"{name} has trained: it is measured by toggling, not estimated")
        gain = min(self.calibration.factor(self.units[name].family) * raw_gain, max(1.0 - base_dice, 0.0))
        self.predicted[name] = raw_gain
        self.source[name] = FIRST_ORDER
        self.utilities[name].update(PER * gain / self.units[name].cost)
        return gain

    def observe_toggle(self, name: str, delta: float) -> None:
        """Record a toggle measurement: ΔDice the unit brings (on − off)."""
        if self.source[name] != TOGGLE:
            if name in self.predicted:
                self.calibration.add(self.units[name].family, self.predicted.pop(name), delta)
            self.utilities[name].reset()
            self.source[name] = TOGGLE
        self.utilities[name].update(PER * delta / self.units[name].cost)
        self.probes[name] += 1
        self.last_probe[name] = self.sampler.audits

    def plan_audit(self) -> list[str]:
        """The units to toggle at this audit (trained ones only)."""
        uncertainty = {n: self.utilities[n].uncertainty for n in self.units}
        return self.sampler.sample(sorted(self.trained), self.active(), self.probes, self.last_probe, uncertainty)

    # -- allocation --------------------------------------------------------------------------------------------------
    def candidates(self, guard_free: bool = False, names=None) -> list[Candidate]:
        active = self.active()
        return [Candidate(n, self.units[n].key, self.units[n].cost, self.value(n), active=n in active,
                          locked=not guard_free and self.controller.locked(n))
                for n in (self.units if names is None else names)]

    def desired(self, guard_free: bool = False, names=None) -> set[str]:
        hysteresis = 0.0 if guard_free else self.config.hysteresis
        return allocate(self.candidates(guard_free, names), self.config.budget, hysteresis)

    def start(self, prior: Sequence[str] = ()) -> dict[str, bool]:
        """First allocation, from the first-order estimates: switched on at once and guarded. The `prior` units
        (the shallow recipe's) are chosen first — all of them when they fit the budget, else the knapsack's best
        among them — and the rest of the budget is filled as usual."""
        desired = self.desired(names=sorted(prior)) if prior else set()
        pinned = [Candidate(c.name, c.key, c.cost, c.value, active=True, locked=True)
                  for c in self.candidates(names=sorted(desired))]
        others = [c for c in self.candidates() if c.name not in desired]
        desired = allocate(pinned + others, self.config.budget, self.config.hysteresis)
        self.history.append(sorted(desired))
        return self.controller.start(sorted(desired), self.config.guard)

    def allocate(self) -> tuple[set[str], dict[str, bool]]:
        """One allocation round: the desired set and the flips the controller made of it."""
        self.rounds += 1
        desired = self.desired()
        self.history.append(sorted(desired))
        priority = {n: self.value(n) * self.units[n].cost for n in desired}
        flips = self.controller.apply(desired, {n: u.cost for n, u in self.units.items()}, self.config.budget,
                                      priority, {n: u.key for n, u in self.units.items()})
        return desired, flips

    # -- final sweep -------------------------------------------------------------------------------------------------
    def final_candidates(self) -> list[tuple[str, frozenset[str]]]:
        """Gate configurations worth comparing at the end: the current set, the recent allocations, a guard-free
        re-solve, the current set without units measured as harmful, and single-swap neighbours. Units that never
        trained are identities and are left out of every candidate."""
        trained, active = self.trained, self.active()
        found: list[tuple[str, frozenset[str]]] = []

        def add(label: str, names) -> None:
            names = frozenset(n for n in names if n in trained)
            if self.budget_used(names) <= self.config.budget and names not in {s for _, s in found}:
                keys = [self.units[n].key for n in names]
                if len(keys) == len(set(keys)):
                    found.append((label, names))

        add("current", active)
        for age, names in enumerate(reversed(self.history)):
            add(f"allocation-{age}", names)
        add("re-solve", self.desired(guard_free=True, names=sorted(trained)))
        add("pruned", {n for n in active if self.utilities[n].score >= 0 or self.source[n] != TOGGLE})
        outside = sorted((n for n in trained if n not in active), key=lambda n: -self.value(n))
        for weakest in sorted(active & trained, key=self.value)[: self.config.swaps]:
            rest = active - {weakest}
            room = self.config.budget - self.budget_used(rest)
            keys = {self.units[n].key for n in rest}
            best = next((n for n in outside if self.units[n].cost <= room and self.units[n].key not in keys), None)
            if best is not None:
                add(f"swap {weakest} → {best}", rest | {best})
            else:
                add(f"drop {weakest}", rest)
        return found

    def vote_rate(self, names) -> float:
        """How often the units appeared in the recent allocations (tie-break of the final sweep)."""
        if not self.history or not names:
            return 0.0
        return sum(sum(n in h for h in self.history) for n in names) / (len(self.history) * len(names))

    # -- events ------------------------------------------------------------------------------------------------------
    def unit_event(self, kind: str, name: str, step: int, **extra) -> dict:
        utility = self.utilities[name]
        event = {"event": kind, "step": step, **self.units[name].describe(), "utility": utility.score,
                 "uncertainty": utility.uncertainty, "evidence": self.source[name],
                 "state": self.controller.units[name].label, "active": name in self.active(),
                 "budget_used": self.budget_used(), "budget": self.config.budget}
        event.update(extra)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}

    # -- checkpoint --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "utilities": {n: u.state_dict() for n, u in self.utilities.items()}, "source": dict(self.source),
            "predicted": dict(self.predicted), "trained": sorted(self.trained), "probes": dict(self.probes),
            "last_probe": dict(self.last_probe), "controller": self.controller.state_dict(),
            "sampler": self.sampler.state_dict(), "calibration": self.calibration.state_dict(),
            "history": [list(h) for h in self.history], "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, values in state["utilities"].items():
            self.utilities[name].load_state_dict(values)
        self.source, self.predicted = dict(state["source"]), dict(state["predicted"])
        self.trained = set(state["trained"])
        self.probes, self.last_probe = dict(state["probes"]), dict(state["last_probe"])
        self.controller.load_state_dict(state["controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.calibration.load_state_dict(state["calibration"])
        self.history = deque((list(h) for h in state["history"]), maxlen=self.config.history)
        self.rounds = state["rounds"]
