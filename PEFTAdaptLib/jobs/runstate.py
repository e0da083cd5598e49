"""A run as a front-end shows it, folded from the worker's events (no Qt, no MRML, no torch)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TERMINAL = ("finished", "failed", "cancelled")
#: a run cancelled before its worker wrote a checkpoint (while it started): what the job list and the run both say
CANCELLED_EARLY = "cancelled before the first checkpoint; nothing was kept"
#: what a phase the worker announces (`phase` events) is called where a word does not say enough
PHASES = {"choosing": "choosing the state to keep", "auditing": "auditing the starting model",
          "allocating": "choosing the first adapter units"}


def phase_words(event: dict) -> str:
    """A `phase` event in words, with what the worker is doing in it (its `detail`) when a phase takes long."""
    words = PHASES.get(event["phase"], event["phase"])
    return f"{words}: {event['detail']}" if event.get("detail") else words


@dataclass
class RunState:
    phase: str = "starting"
    detail: str = ""  # what the worker is doing within a long phase, e.g. "auditing unit set 2 of 4"
    task: str = "adapt"
    method: str = ""
    rank: int | None = None
    rank_reason: str = ""
    budget_reason: str = ""
    trainable: int | None = None
    total: int | None = None
    #: of `trainable`, a new head trained in full (its model has no trained one): the start is then no candidate
    trained_in_full: int | None = None
    step: int = 0
    steps: int = 0
    eta_s: float | None = None
    loss: float | None = None
    first_dice: float | None = None
    last_dice: float | None = None
    best_dice: float | None = None
    first_agreement: float | None = None
    last_agreement: float | None = None
    best_agreement: float | None = None
    outcome: str | None = None  # finished / failed / cancelled
    message: str = ""
    exit_code: int | None = None  # the worker's (PEFTAdaptLib.worker)
    needs: str = ""  # a refused job: what the user must add ("annotation": more annotated slices; errors.py)
    kept: str = ""  # "adapted", or "start": no state passed the selection rule, the starting model is kept
    gain: float | None = None  # audit Dice gain of the kept state over the start, with its lower confidence bound
    gain_low: float | None = None
    classes: dict = field(default_factory=dict)  # audit Dice per class of the kept state
    warnings: list[str] = field(default_factory=list)
    active_units: int | None = None
    units: list[str] = field(default_factory=list)  # active units ("layer::unit"); at the end, the kept state's
    budget_used: float | None = None
    budget: float | None = None
    predictions: list[str] = field(default_factory=list)
    checkpoint: str = ""  # the last checkpoint written (of any session): what a cancel keeps

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def succeeded(self) -> bool:
        return self.outcome == "finished"

    @property
    def trainable_text(self) -> str:
        """The trainable count, split into adapter and new head where a head is trained in full (a 1 % method
        trains far more then); once the starting state is kept, it says those parameters were not delivered."""
        if self.trainable is None or not self.total:
            return ""
        share = lambda count: f"{100 * count / self.total:.2f} %"  # noqa: E731
        text = f"{self.trainable:,} of {self.total:,} parameters ({share(self.trainable)})"
        if self.trained_in_full:
            adapter = self.trainable - self.trained_in_full
            text += f": {adapter:,} adapter ({share(adapter)}) + {self.trained_in_full:,} new head trained in full"
        return text + (", trained but not kept" if self.kept == "start" else "")

    def update(self, event: dict) -> None:
        kind = event.get("event", "")
        if kind in ("started", "step", "phase", "prediction", *TERMINAL):
            self.detail = event.get("detail", "") if kind == "phase" else ""
        if kind == "started":
            self.reopen()  # a resumed session: the earlier one's outcome is not this one's
            self.phase = "training" if event.get("task", "adapt") == "adapt" else "predicting"
            self.task = event.get("task", self.task)
            self.steps = int(event.get("steps") or self.steps or 0)
            for key in ("method", "rank", "rank_reason", "budget_reason", "trainable", "total"):
                if event.get(key) is not None:
                    setattr(self, key, event[key])
            self.trained_in_full = event.get("trained_in_full")
            for key in ("dice", "agreement"):  # a resumed run's start score (its checkpoint's), if the log lost it
                if event.get(f"start_{key}") is not None and getattr(self, f"first_{key}") is None:
                    self._score(key, float(event[f"start_{key}"]))
        elif kind == "step":
            self.phase = "training"
            self.step = int(event["step"])
            self.steps = int(event.get("steps") or self.steps)
            self.loss = event.get("loss", self.loss)
            self.eta_s = event.get("eta_s", self.eta_s)
        elif kind in ("allocation", "final_selection", "kept_allocation"):  # SEA-PEFT's rounds, final sweep, kept set
            self.units = list(event.get("units", self.units))
            self.active_units = len(self.units)
            self.budget_used = event.get("budget_used", self.budget_used)
            self.budget = event.get("budget", self.budget)
        elif kind == "validation":
            self.kept = event.get("kept", self.kept)
            self.gain, self.gain_low = event.get("gain"), event.get("gain_low")
            self.classes = event.get("classes") or self.classes
        elif kind == "phase" and event.get("phase"):
            self.phase = event["phase"]
        elif kind == "checkpoint":
            self.checkpoint = event.get("path") or "checkpoint"
        elif kind == "warning" and event.get("message"):
            self.warnings.append(event["message"])
        elif kind == "prediction" and event.get("path"):
            self.phase = "predicting"
            self.predictions.append(event["path"])
            if self.task == "predict":  # a predict job's steps are its volumes
                self.step = len(self.predictions)
        if kind in ("audit", "agreement", "validation"):
            for key in ("dice", "agreement"):
                if event.get(key) is not None:
                    self._score(key, float(event[key]))
        if kind in TERMINAL:
            if event.get("trainable") is not None:  # the kept state's count (SEA-PEFT's final units)
                self.trainable = event["trainable"]
            self.outcome = kind
            self.phase = kind
            self.message = event.get("message") or event.get("reason") or ""
            self.exit_code = event.get("exit_code", self.exit_code)
            self.needs = event.get("needs", "")
            self.kept = event.get("kept", self.kept)

    def _score(self, key: str, value: float) -> None:
        if getattr(self, f"first_{key}") is None:
            setattr(self, f"first_{key}", value)
        setattr(self, f"last_{key}", value)
        best = getattr(self, f"best_{key}")
        setattr(self, f"best_{key}", value if best is None else max(best, value))

    def reopen(self) -> None:
        """Forget how the last session ended (its events stay folded in): the job runs again, and whether it keeps
        an adapted state is this session's to say."""
        self.outcome, self.phase, self.message, self.exit_code, self.needs = None, "starting", "", None, ""
        self.kept = ""

    def fail(self, message: str) -> None:
        """The process ended without a terminal event (killed, crashed before writing one)."""
        if not self.finished:
            self.outcome, self.phase, self.message = "failed", "failed", message

    def describe(self) -> str:
        if self.outcome == "failed":
            return f"{'More annotation needed' if self.needs == 'annotation' else 'Failed'}: {self.message}"
        if self.outcome == "cancelled" and not self.checkpoint:
            return CANCELLED_EARLY.capitalize()
        if self.outcome == "cancelled":
            return "Cancelled — the last checkpoint was kept" + (f": {self.message}" if self.kept else "")
        if self.outcome == "finished":
            checks = "".join(f"\nCheck: {warning}" for warning in self.warnings)
            return "Finished" + (f" — {self.message}" if self.message else "") + checks
        parts = [phase_words({"phase": self.phase, "detail": self.detail}).capitalize()]
        if self.steps:
            parts.append(f"step {self.step}/{self.steps}")
        if self.eta_s is not None and self.phase == "training":
            minutes, seconds = divmod(int(self.eta_s), 60)
            parts.append(f"about {minutes} min {seconds:02d} s left")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        return ", ".join(parts)

    @property
    def gain_text(self) -> str:
        """The audit's verdict in one line, e.g. `audit Dice +2.3 points (95 % lower bound +0.8)`."""
        if self.gain is None:
            return ""
        low = f" (95 % lower bound {100 * self.gain_low:+.1f})" if self.gain_low is not None else ""
        return f"audit Dice {100 * self.gain:+.1f} points{low}"

    @property
    def dice_text(self) -> str:
        """A finished run's audit Dice, from the start to the state kept, with the verdict: what every front-end shows
        (a cancelled run says what its adapter holds in its message instead). A new head's start is no model to
        compare with: the kept state's Dice alone."""
        if self.first_dice is None or self.outcome != "finished":
            return ""
        if self.trained_in_full:
            return f"audit Dice: kept {self.last_dice:.4f}"
        return (f"audit Dice: start {self.first_dice:.4f}, kept {self.last_dice:.4f}"
                + (f" — {self.gain_text}" if self.gain_text else ""))

    @property
    def class_text(self) -> str:
        """The kept state's audit Dice per class, when the model has several."""
        if len(self.classes) < 2:
            return ""
        return "audit Dice per class: " + ", ".join(f"{name} {value:.4f}" for name, value in self.classes.items()
                                                    if value is not None)

    @property
    def allocation_summary(self) -> str:
        """How many units SEA-PEFT keeps active and, on a second line, where they went: how many of each kind and
        in each module below the prefix all their layers share (`model.` of a MONAI UNet). Nothing once the starting
        state is kept: no allocation is delivered then."""
        if self.active_units is None or self.kept == "start":
            return ""
        text = f"{self.active_units} active adapter units"
        if self.budget_used is not None and self.budget:
            text += f", {self.budget_used:,.0f} of {self.budget:,.0f} budget parameters used"
        if self.units:
            kinds = Counter(name.split("::")[-1].replace("sea_", "", 1) for name in self.units)
            layers = [name.split("::")[0].split(".") for name in self.units]
            shared = 0
            while all(len(layer) > shared + 1 and layer[shared] == layers[0][shared] for layer in layers):
                shared += 1
            modules = Counter(".".join(layer[:shared + 1]) for layer in layers)
            listed = lambda counts: ", ".join(f"{key} {n}" for key, n in sorted(counts.items()))  # noqa: E731
            text += f"\nby kind: {listed(kinds)}; by module: {listed(modules)}"
        return text
