"""A trainable-parameter budget: a fraction of the model's parameters or an absolute count.

This is the one meaning of "budget" every front-end and method shares. The panel edits it in percent, the command
line accepts `1%`, `0.01` or `21262`, and `job.json` stores `{"fraction": 0.01}` or `{"count": 21262}`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

#: the budget of a method that takes one when neither the user nor the model card gives one
DEFAULT_FRACTION = 0.01
#: the model card's `extra` key that overrides DEFAULT_FRACTION for that model
CARD_KEY = "default_budget"


@dataclass(frozen=True)
class Budget:
    fraction: float | None = None
    count: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.count is None):
            raise InputError("budget: give either a fraction of the model's parameters or a parameter count")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                    or not math.isfinite(self.fraction) or not 0 < self.fraction <= 1:
                raise InputError(f"budget: fraction {self.fraction!r} must be a number in (0, 1] (0.01 = 1 %)")
        elif isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise InputError(f"budget: count {self.count!r} must be a whole number of parameters ≥ 1")

    @classmethod
    def parse(cls, text: str | float | int) -> "Budget":
        """`1%` or `0.5 %` (percent), a number below 1 or written with a decimal point (fraction: `1.0` is the whole
        model, never one parameter), a whole number ≥ 1 (parameter count)."""
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                return cls(fraction=float(raw[:-1]) / 100)
            value = float(raw)
        except ValueError:
            raise InputError(f"budget: '{raw}' is not a number, a percentage (1%) or a parameter count") from None
        if not math.isfinite(value):
            raise InputError(f"budget: '{raw}' is not a finite number")
        if value > 1 and (value != int(value) or "." in raw):
            raise InputError(f"budget: '{raw}' is neither a fraction up to 1 nor a whole parameter count "
                             f"(for a percentage write {raw}%)")
        if value < 1 or "." in raw:
            return cls(fraction=value)
        return cls(count=int(value))

    @classmethod
    def from_dict(cls, data, where: str = "budget") -> "Budget | None":
        if data is None or isinstance(data, Budget):
            return data
        if not isinstance(data, dict) or set(data) - {"fraction", "count"}:
            raise InputError(f"{where}: expected {{\"fraction\": x}} or {{\"count\": n}}, got {data!r}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"fraction": self.fraction} if self.fraction is not None else {"count": self.count}

    def parameters(self, total: int) -> int:
        """The budget as a parameter count for a model of `total` parameters."""
        if self.count is not None:
            if self.count > total:
                raise InputError(f"budget: {self.count:,} parameters is more than the model's {total:,}")
            return self.count
        return max(1, int(self.fraction * total))

    def describe(self, total: int | None = None) -> str:
        """How the budget was understood, for the command line and the event log."""
        if self.count is not None:
            text = f"{self.count:,} parameters"
            return text + (f" ({100 * self.count / total:.3g} % of {total:,})" if total else "")
        text = f"{100 * self.fraction:g} % of the model's parameters"
        return text + (f" = {self.parameters(total):,} of {total:,}" if total else "")


def default_budget(card_extra: dict | None = None) -> Budget:
    """The model card's default budget (a fraction under `extra.default_budget`), else 1 %."""
    fraction = (card_extra or {}).get(CARD_KEY, DEFAULT_FRACTION)
    return Budget(fraction=float(fraction))
