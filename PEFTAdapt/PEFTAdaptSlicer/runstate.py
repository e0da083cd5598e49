"""The panel's view of one background run, folded from the worker's events (no Qt, no MRML)."""
from __future__ import annotations

from dataclasses import dataclass, field

TERMINAL = {"finished", "failed", "cancelled"}


@dataclass
class RunState:
    phase: str = "starting"
    step: int = 0
    steps: int = 0
    eta_s: float | None = None
    loss: float | None = None
    first_dice: float | None = None
    last_dice: float | None = None
    best_dice: float | None = None
    outcome: str | None = None  # finished / failed / cancelled
    message: str = ""
    active_units: int | None = None
    budget_used: float | None = None
    budget: float | None = None
    predictions: list[str] = field(default_factory=list)
    checkpoints: int = 0

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def update(self, event: dict) -> None:
        kind = event.get("event", "")
        if kind == "started":
            self.phase = "training"
            self.steps = int(event.get("steps", self.steps) or 0)
        elif kind == "step":
            self.phase = "training"
            self.step = int(event["step"])
            self.steps = int(event.get("steps", self.steps) or self.steps)
            self.loss = event.get("loss", self.loss)
            self.eta_s = event.get("eta_s", self.eta_s)
        elif kind in ("audit", "validation") and event.get("dice") is not None:
            dice = float(event["dice"])
            self.first_dice = dice if self.first_dice is None else self.first_dice
            self.last_dice = dice
            self.best_dice = dice if self.best_dice is None else max(self.best_dice, dice)
        elif kind == "allocation":
            self.active_units = event.get("active_units", self.active_units)
            self.budget_used = event.get("budget_used", self.budget_used)
            self.budget = event.get("budget", self.budget)
        elif kind == "checkpoint":
            self.checkpoints += 1
        elif kind == "prediction" and event.get("path"):
            self.phase = "predicting"
            self.predictions.append(event["path"])
        if kind in TERMINAL:
            self.outcome = kind
            self.phase = kind
            self.message = event.get("message") or event.get("reason") or ""

    def fail(self, message: str) -> None:
        """The process ended without a terminal event (killed, crashed before writing one)."""
        if not self.finished:
            self.outcome, self.phase, self.message = "failed", "failed", message

    def describe(self) -> str:
        if self.outcome == "failed":
            return f"Failed: {self.message}"
        if self.outcome == "cancelled":
            return "Cancelled — the last checkpoint was kept"
        if self.outcome == "finished":
            return "Finished" + (f" — best audit Dice {self.best_dice:.3f}" if self.best_dice is not None else "")
        parts = [self.phase.capitalize()]
        if self.steps:
            parts.append(f"step {self.step}/{self.steps}")
        if self.eta_s is not None and self.phase == "training":
            minutes, seconds = divmod(int(self.eta_s), 60)
            parts.append(f"about {minutes} min {seconds:02d} s left")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        return ", ".join(parts)

    @property
    def allocation_summary(self) -> str:
        if self.active_units is None:
            return ""
        text = f"{self.active_units} active adapter units"
        if self.budget_used is not None and self.budget:
            text += f", {self.budget_used:,.0f} of {self.budget:,.0f} budget parameters used"
        return text
