"""Robust utility of a unit from noisy audit measurements (reference `sea_peft/utility.py`): an EMA of the
measurements, a window of the last EMA values, a pessimistic score median − λ·IQR (inclusive quartiles), and the
residual |EMA − score| as the uncertainty the knapsack rewards with an exploration bonus."""
from __future__ import annotations

import statistics
from collections import deque


class RobustUtility:
    def __init__(self, beta: float = 0.93, window: int = 5, iqr_weight: float = 0.25):
        self.beta, self.window, self.iqr_weight = beta, window, iqr_weight
        self.ema: float | None = None
        self.history: deque[float] = deque(maxlen=window)
        self.observations = 0

    def update(self, value: float) -> None:
        self.ema = float(value) if self.ema is None else self.beta * self.ema + (1 - self.beta) * float(value)
        self.history.append(self.ema)
        self.observations += 1

    def reset(self) -> None:
        """Forget everything (a unit whose evidence changes kind: first-order estimates → toggle measurements)."""
        self.ema, self.observations = None, 0
        self.history.clear()

    @property
    def score(self) -> float:
        """median(W) − λ·IQR(W) over the window W of EMA values; 0 before any observation."""
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
