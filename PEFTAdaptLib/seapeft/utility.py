"""Robust utility of a unit from noisy audit measurements: EMA, then a pessimistic median − λ·IQR over a window."""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RobustUtility:
    beta: float = 0.93  # EMA decay (0.95 for one-shot in the reference)
    window: int = 5
    iqr_weight: float = 0.25
    ema: float | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=5))
    observations: int = 0

    def __post_init__(self):
        self.history = deque(self.history, maxlen=self.window)

    def update(self, value: float) -> None:
        self.ema = value if self.ema is None else self.beta * self.ema + (1 - self.beta) * value
        self.history.append(self.ema)
        self.observations += 1

    @property
    def score(self) -> float:
        """median(W) − λ·IQR(W) of the EMA window; 0 before any observation."""
        if not self.history:
            return 0.0
        values = list(self.history)
        if len(values) == 1:
            return values[0]
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return statistics.median(values) - self.iqr_weight * max(q3 - q1, 0.0)

    @property
    def uncertainty(self) -> float:
        return 0.0 if self.ema is None else abs(self.ema - self.score)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "history": list(self.history), "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.observations = state["ema"], state["observations"]
        self.history = deque(state["history"], maxlen=self.window)
