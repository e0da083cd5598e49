"""SEA-PEFT as a training hook: search → audit → allocate on the live network, with events and checkpointable state.

Schedule (steps are optimizer steps; `training.Trainer` calls `after_step` after each one):

- start (`on_start`): the fixed audit buffer (the whole audit volume where it fits); first-order estimate for
  every unit (all are untrained); the first allocation — the shallow recipe's units, then the rest of the budget —
  is switched on at once and guarded (warm-up: nothing is re-allocated before `warmup`);
- every `audit_every` steps: toggle a sample of trained units on the buffer (ΔDice), update their utilities;
- every `allocate_every` steps from `warmup` on (not at the last step): re-estimate the untrained units, solve the
  knapsack, let the controller flip gates;
- at the last step (`config.steps`): the final configuration sweep sets the gates of the best candidate (the set
  the training ended on, unless another is better by the selection rule), which the trainer's own audit then
  compares with its best state so far;
- when the trainer restores its best state (`on_restore`): `kept_allocation` names that state's units, the
  adapter the job keeps.

All pool units sit in the optimizer from the start; a gated-off unit gets no gradient, so AdamW leaves it alone.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

from ..adapters.base import iter_units
from ..adapters.shallow import shallow_layers
from ..errors import PEFTAdaptError
from ..models.card import FIXED_INPUT_SIZE
from ..training import StopRequested, phase_event
from .allocator import Allocator
from .audit import AuditBuffer
from .config import SeaPeftConfig
from .estimate import first_order_gain
from .pool import PoolUnit

PHASES = ("audit", "estimate", "allocate", "final")
PRIORS = ("shallow", "none")
#: final-sweep candidates (best on the buffer first) judged on the whole audit volumes by the selection rule, beside
#: the current set
JUDGED_CANDIDATES = 3


class SeaPeftHook:
    def __init__(self, network: nn.Module, pool: Sequence[PoolUnit], config: SeaPeftConfig):
        if config.prior not in PRIORS:
            raise PEFTAdaptError(f"SEA-PEFT prior '{config.prior}' unknown; choose one of {', '.join(PRIORS)}")
        self.network, self.config = network, config
        self.allocator = Allocator(pool, config)
        self.records = {f"{r.layer}::{r.name}": r for r in iter_units(network)}
        missing = [u.name for u in pool if u.name not in self.records]
        if missing:
            raise ValueError(f"pool units not in the network: {missing[:3]}")
        self.buffer: AuditBuffer | None = None
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.final: dict | None = None

    # -- gates -------------------------------------------------------------------------------------------------------
    def _gate(self, name: str, on: bool) -> None:
        record = self.records[name]
        record.owner.set_active(record.name, on)

    def _sync_gates(self, names=None) -> None:
        active = self.allocator.active() if names is None else set(names)
        for name in self.allocator.units:
            self._gate(name, name in active)

    def active_units(self) -> list[str]:
        return sorted(n for n in self.allocator.units if self.records[n].active)

    def _ensure_buffer(self, context) -> None:
        if self.buffer is None:
            self.buffer = AuditBuffer(context.audit, context.card.patch_size, self.config.audit_patches,
                                      self.config.seed, context.device, context.card.divisible_by,
                                      not context.card.extra.get(FIXED_INPUT_SIZE))

    def _timed(self, phase: str, start: float) -> None:
        self.seconds[phase] += time.monotonic() - start

    # -- loop --------------------------------------------------------------------------------------------------------
    def on_start(self, context) -> None:
        self._ensure_buffer(context)
        fresh = len(self.allocator.fresh())
        context.emit(phase_event("allocating", 0, f"estimating the gain of {fresh} candidate units"))
        self._estimate(0, context)
        start = time.monotonic()
        flips = self.allocator.start(self._prior())
        self._sync_gates()
        self._timed("allocate", start)
        self._emit_allocation(0, context, set(flips), flips)

    def after_step(self, step: int, context) -> None:
        self._ensure_buffer(context)
        self.allocator.mark_trained()
        last = self.config.steps is not None and step >= self.config.steps
        if step % self.config.audit_every == 0 or last:
            self._audit(step, context)
        if step >= self.config.warmup and step % self.config.allocate_every == 0 and not last:
            self._estimate(step, context)
            start = time.monotonic()
            desired, flips = self.allocator.allocate()
            self._sync_gates()
            self._timed("allocate", start)
            self._emit_allocation(step, context, desired, flips)
        if last and self.final is None:
            self._final(step, context)

    def _audit(self, step: int, context) -> None:
        start = time.monotonic()
        sample = self.allocator.plan_audit()
        if not sample:
            self._timed("audit", start)
            return
        base = self.buffer.dice(self.network)
        active = set(self.active_units())
        by_key = {self.allocator.units[n].key: n for n in active}
        events = []
        for name in sample:
            if name in active:
                self._gate(name, False)
                delta = base - self.buffer.dice(self.network)
                self._gate(name, True)
            else:  # measured in the place it would take: instead of the active variant of its (site, family)
                occupant = by_key.get(self.allocator.units[name].key)
                reference = base
                if occupant is not None:
                    self._gate(occupant, False)
                    reference = self.buffer.dice(self.network)
                self._gate(name, True)
                delta = self.buffer.dice(self.network) - reference
                self._gate(name, False)
                if occupant is not None:
                    self._gate(occupant, True)
            self.allocator.observe_toggle(name, delta)
            events.append(self.allocator.unit_event("unit_audit", name, step, delta_dice=delta, estimate="toggle",
                                                    base_dice=base))
        self._timed("audit", start)
        for event in events:
            context.emit(event)

    def _estimate(self, step: int, context) -> None:
        """First-order ΔDice of every untrained unit, all switched on at once (they are identities)."""
        start = time.monotonic()
        fresh = self.allocator.fresh()
        if not fresh:
            return
        for name in fresh:
            self._gate(name, True)
        try:
            params = {n: list(self.records[n].unit.parameters()) for n in fresh}
            base, norms = self.buffer.gradients(self.network, params)
        finally:
            self._sync_gates()
        horizon = self.config.allocate_every
        gains = {n: self.allocator.observe_estimate(
                     n, first_order_gain(norms[n], self.config.lr * self.records[n].unit.lr_scale, horizon), base)
                 for n in fresh}
        self._timed("estimate", start)
        for name in fresh:
            context.emit(self.allocator.unit_event("unit_audit", name, step, delta_dice=gains[name],
                                                   estimate="first_order", base_dice=base))

    def _prior(self) -> list[str]:
        """The shallow recipe's units in the pool: dense deltas on the layers nearest the input and the output (by
        depth on the computation graph, adapters/shallow.py) and norm-affine on every norm."""
        if self.config.prior != "shallow":
            return []
        layers = set(shallow_layers(self.network, self.buffer.batches[0][0]))
        return [u.name for u in self.allocator.pool
                if u.family == "norm_affine" or (u.family == "dense" and u.site in layers)]

    def _emit_allocation(self, step: int, context, desired: set[str], flips: dict[str, bool]) -> None:
        for name in sorted(flips):
            context.emit(self.allocator.unit_event("unit_state", name, step))
        active = self.active_units()
        context.emit({
            "event": "allocation", "step": step, "round": self.allocator.rounds, "active_units": len(active),
            "units": active, "desired": len(desired), "budget_used": self.allocator.budget_used(),
            "budget": self.config.budget, "changes": {n: ("on" if on else "off") for n, on in sorted(flips.items())},
            "calibration": self.allocator.calibration.factors(), "seconds": dict(self.seconds),
        })

    def _final(self, step: int, context) -> None:
        """Rank the candidate unit sets on the buffer; judge the best few and the current set as the trainer judges
        every state (whole audit volumes, the selection rule); keep the one `final_choice` picks, else the
        buffer's best."""
        start = time.monotonic()
        scored = []
        for label, names in self.allocator.final_candidates():
            self._sync_gates(names)
            scored.append({"label": label, "units": sorted(names), "dice": self.buffer.dice(self.network),
                           "cost": self.allocator.budget_used(names), "vote_rate": self.allocator.vote_rate(names)})
        scored.sort(key=lambda c: (round(c["dice"], 6), -c["cost"], c["vote_rate"]), reverse=True)
        best = scored[0]
        if context.judge is not None:
            judged = scored[:JUDGED_CANDIDATES] + [c for c in scored[JUDGED_CANDIDATES:] if c["label"] == "current"]
            for index, candidate in enumerate(judged, 1):
                if context.should_stop():  # each audit is a whole-volume prediction: a cancel does not wait for them
                    raise StopRequested  # the trainer puts this hook back as it was before the step (gates included)
                context.emit(phase_event("choosing", step, f"auditing unit set {index} of {len(judged)}"))
                self._sync_gates(candidate["units"])
                score, verdict = context.judge()
                candidate.update(score=score, audit_dice=score.value, reliable=verdict is None or verdict.reliable)
            best = final_choice(judged, context.compare) or best
        before = self.allocator.active()
        self.allocator.controller.finish(best["units"])
        self._sync_gates()
        self._timed("final", start)
        for name in sorted(before.symmetric_difference(best["units"])):  # the GUI's unit table ends on the final set
            context.emit(self.allocator.unit_event("unit_state", name, step))
        self.final = {"event": "final_selection", "step": step, "chosen": best["label"], "units": best["units"],
                      "previous_units": sorted(before),
                      "dice": best["dice"], "budget_used": best["cost"], "budget": self.config.budget,
                      "audit_dice": best.get("audit_dice"), "reliable": best.get("reliable"),
                      "candidates": [{k: c[k] for k in ("label", "dice", "cost", "audit_dice", "reliable") if k in c}
                                     for c in scored],
                      "seconds": dict(self.seconds)}
        context.emit(self.final)

    def on_restore(self, step: int, best_step: int, context) -> None:
        """The trainer restored its best state (audited at `best_step`), gates included: that is the adapter the job
        keeps, not the last allocation or final sweep, so the allocator takes its set and `kept_allocation` names
        it (the GUI's unit table ends on it too)."""
        kept, before = set(self.active_units()), self.allocator.active()
        self.allocator.controller.finish(kept)
        for name in sorted(before.symmetric_difference(kept)):
            context.emit(self.allocator.unit_event("unit_state", name, step))
        context.emit({"event": "kept_allocation", "step": step, "best_step": best_step, "units": sorted(kept),
                      "active_units": len(kept), "budget_used": self.allocator.budget_used(kept),
                      "budget": self.config.budget})

    # -- reporting ---------------------------------------------------------------------------------------------------
    def allocation(self) -> list[dict]:
        """The active units with their descriptors and utilities (for tables and reports)."""
        return [{**self.allocator.units[n].describe(), "utility": self.allocator.utilities[n].score}
                for n in self.active_units()]

    # -- checkpoint --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"allocator": self.allocator.state_dict(), "seconds": dict(self.seconds), "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state["allocator"])
        self.seconds = dict(state["seconds"])
        self.final = state["final"]
        self._sync_gates()


def final_choice(judged: Sequence[dict], compare) -> dict | None:
    """The final sweep's pick among `judged` candidates (each with its audit `score` and `reliable`: whether the
    selection rule lets it replace the start): the accepted one with the best audit Dice — but the set the training
    ended on (`current`) stays unless that one beats it by the same rule (`compare`, the scorer's judge), since a
    gap within the audit's own noise is no reason to change the trained set. None when none is accepted."""
    accepted = [c for c in judged if c["reliable"]]
    if not accepted:
        return None
    best = max(accepted, key=lambda c: c["score"].value)
    current = next((c for c in accepted if c["label"] == "current"), None)
    if current is not None and best is not current and compare is not None:
        verdict = compare(best["score"], current["score"])
        if verdict is not None and not verdict.reliable:
            return current
    return best
