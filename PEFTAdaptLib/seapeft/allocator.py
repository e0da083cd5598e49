"""The SEA-PEFT training hook: audits units on a fixed buffer, smooths their utilities, allocates under the budget.

Search: the pool (every site × family) sits in the network, inactive. Audit: every `audit_every` steps a sample of
units is measured on a fixed set of audit patches — an active unit by switching it off (ΔDice = D − D_off), a unit
that has been trained before by switching it on (D_on − D) — and units that were never trained by a first-order
estimate: all of them are identity maps at their start, so switching them all on leaves the output unchanged and
one backward pass gives each one's gradient g of the audit soft Dice; Adam moves every parameter by about η per
step, so k steps of training buy about η·k·‖g‖₁ Dice. (The reference scored such units exactly 0, so they could
never enter.) Allocate: every `allocate_every` steps a greedy knapsack picks the best utility per parameter, one
variant per (site, family), within the budget; a vote/guard controller applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceLoss

from ..adapters.base import iter_units
from .controller import Controller
from .knapsack import Candidate, allocate
from .pool import PoolUnit
from .utility import RobustUtility

PER = 1000.0  # utilities are Dice per 1000 parameters: readable numbers in events and tables


@dataclass
class SeaPeftConfig:
    budget: int  # trainable parameters, binding
    audit_every: int = 10
    allocate_every: int = 20
    audit_units: int = 12  # units measured per audit (plus every never-trained unit, by gradient, for free)
    audit_patches: int = 2
    beta: float = 0.93
    window: int = 5
    iqr_weight: float = 0.25
    exploration: float = 0.5  # bonus on uncertainty
    hysteresis: float = 0.0005  # Dice per 1000 parameters an active unit may lose before it is dropped
    votes: int = 2
    guard: int = 2
    lr: float = 2e-3  # the optimizer's learning rate (for the first-order estimate)
    seed: int = 0


class SeaPeftHook:
    def __init__(self, network: torch.nn.Module, pool: list[PoolUnit], config: SeaPeftConfig):
        self.network, self.pool, self.config = network, pool, config
        self.by_name = {u.name: u for u in pool}
        self.gates = {f"{r.layer}::{r.name}": r for r in iter_units(network)}
        self.utilities = {u.name: RobustUtility(config.beta, window=config.window, iqr_weight=config.iqr_weight)
                          for u in pool}
        self.controller = Controller([u.name for u in pool], config.votes, config.guard)
        self.trained: set[str] = set()
        self.rng = np.random.default_rng(config.seed)
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
        self.audit_seconds = 0.0

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _set(self, name: str, active: bool) -> None:
        record = self.gates[name]
        record.owner.set_active(record.name, active)

    def active_units(self) -> list[str]:
        return [u.name for u in self.pool if self.gates[u.name].active]

    def budget_used(self) -> int:
        return sum(self.by_name[n].cost for n in self.active_units())

    def _build_buffer(self, context) -> None:
        from ..training import PatchSampler

        sampler = PatchSampler(context.audit, context.card.patch_size, self.config.audit_patches, 0.5,
                               seed=self.config.seed + 1)
        self.buffer = sampler()

    def _soft_dice(self, context) -> float:
        image, label = self.buffer
        device = context.device
        self.network.eval()
        with torch.no_grad():
            value = 1.0 - float(self.dice(self.network(image.to(device)).float(), label.to(device)))
        return value

    def _gradient_estimates(self, context, names: list[str]) -> dict[str, float]:
        """First-order Dice gain of training each never-trained unit for `allocate_every` Adam steps."""
        if not names:
            return {}
        image, label = self.buffer
        for name in names:
            self._set(name, True)
        self.network.eval()
        params = {name: list(self.gates[name].unit.parameters()) for name in names}
        flat = [p for ps in params.values() for p in ps]
        for p in flat:
            p.grad = None
        soft_dice = 1.0 - self.dice(self.network(image.to(context.device)).float(), label.to(context.device))
        grads = torch.autograd.grad(soft_dice, flat, allow_unused=True)
        for name in names:
            self._set(name, False)
        estimates, index = {}, 0
        for name, ps in params.items():
            g1 = sum(float(g.abs().sum()) for g in grads[index:index + len(ps)] if g is not None)
            index += len(ps)
            estimates[name] = self.config.lr * self.config.allocate_every * g1
        return estimates

    # -- hook ------------------------------------------------------------------------------------------------------
    def on_start(self, context) -> None:
        """Estimate every unit and activate the first allocation at once (nothing trains before it)."""
        self._build_buffer(context)
        self._audit(context, step=0, sample=[])
        desired = self._desired()
        for name in desired:
            self.controller.force(name, True)
            self._set(name, True)
        self._emit_allocation(context, 0, {name: True for name in desired})

    def after_step(self, step: int, context) -> None:
        if self.buffer is None:
            self._build_buffer(context)
        if step % self.config.audit_every == 0:
            active = self.active_units()
            inactive = [u.name for u in self.pool if u.name not in active and u.name in self.trained]
            quota = min(self.config.audit_units, len(active) + len(inactive))
            on_share = min(len(active), max(1, int(round(0.7 * quota))) if active else 0)
            sample = list(self.rng.choice(active, on_share, replace=False)) if on_share else []
            rest = quota - len(sample)
            if rest > 0 and inactive:
                sample += list(self.rng.choice(inactive, min(rest, len(inactive)), replace=False))
            self._audit(context, step, sample)
        if step % self.config.allocate_every == 0:
            flips = self.controller.apply(self._desired())
            for name, active in flips.items():
                self._set(name, active)
            flips.update(self._repair())
            self._emit_allocation(context, step, flips)

    def _audit(self, context, step: int, sample: list[str]) -> None:
        import time

        start = time.monotonic()
        self.trained.update(self.active_units())
        base = self._soft_dice(context)
        measured: dict[str, float] = {}
        for name in sample:
            was_active = self.gates[name].active
            self._set(name, not was_active)
            toggled = self._soft_dice(context)
            self._set(name, was_active)
            measured[name] = base - toggled if was_active else toggled - base
        fresh = [u.name for u in self.pool if u.name not in self.trained]
        estimated = self._gradient_estimates(context, fresh)
        for name, delta in list(measured.items()) + list(estimated.items()):
            unit = self.by_name[name]
            self.utilities[name].update(PER * delta / max(unit.cost, 1))
            if name in measured or self.utilities[name].observations == 1 or name in self.active_units():
                context.emit(self._unit_event("unit_audit", name, step, delta,
                                              "measured" if name in measured else "gradient"))
        self.audit_seconds += time.monotonic() - start

    def _desired(self) -> set[str]:
        active = set(self.active_units())
        candidates = [
            Candidate(u.name, u.key, u.cost,
                      self.utilities[u.name].score + self.config.exploration * self.utilities[u.name].uncertainty,
                      active=u.name in active,
                      locked=u.name in active and self.controller.units[u.name].guard > 0)
            for u in self.pool
        ]
        return allocate(candidates, self.config.budget, self.config.hysteresis)

    def _repair(self) -> dict[str, bool]:
        """The budget is binding: drop the lowest-utility active units (guards yield) until it holds."""
        dropped = {}
        for name in sorted(self.active_units(), key=lambda n: self.utilities[n].score):
            if self.budget_used() <= self.config.budget:
                break
            self.controller.force(name, False)
            self._set(name, False)
            dropped[name] = False
        return dropped

    def _unit_event(self, kind: str, name: str, step: int, delta: float | None = None, estimate: str = "") -> dict:
        unit, utility = self.by_name[name], self.utilities[name]
        event = {"event": kind, "step": step, "unit": name, "site": unit.layer, "family": unit.family,
                 "rank": unit.rank, "cost": unit.cost, "utility": utility.score, "uncertainty": utility.uncertainty,
                 "state": self.controller.units[name].label}
        if delta is not None:
            event.update(delta_dice=delta, estimate=estimate)
        return event

    def _emit_allocation(self, context, step: int, flips: dict[str, bool]) -> None:
        for name in flips:
            context.emit(self._unit_event("unit_state", name, step))
        context.emit({"event": "allocation", "step": step, "active_units": len(self.active_units()),
                      "budget_used": self.budget_used(), "budget": self.config.budget,
                      "changes": {name: ("on" if active else "off") for name, active in flips.items()}})

    # -- checkpoint ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"utilities": {n: u.state_dict() for n, u in self.utilities.items()},
                "controller": self.controller.state_dict(), "trained": sorted(self.trained),
                "rng": self.rng.bit_generator.state, "active": self.active_units(),
                "audit_seconds": self.audit_seconds}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state["utilities"].items():
            self.utilities[name].load_state_dict(values)
        self.controller.load_state_dict(state["controller"])
        self.trained = set(state["trained"])
        self.rng.bit_generator.state = state["rng"]
        self.audit_seconds = state["audit_seconds"]
        for unit in self.pool:
            self._set(unit.name, unit.name in state["active"])
