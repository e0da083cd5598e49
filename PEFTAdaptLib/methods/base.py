"""What a user-facing adaptation method is: a self-validating config dataclass, registered by name.

As in HF peft (`register_peft_method`), a method is one class in one file: its name, a one-line label, what it takes
(a rank, a budget, or neither) with defaults and valid values, and how it builds its adapter units on a network.
Configs are plain data and import no torch, so the job client and the panels validate a request where it is made;
`build` runs in the worker. Third-party methods register through the `peftadapt.methods` entry-point group.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError
from .budget import Budget, default_budget

if TYPE_CHECKING:  # the worker's side only
    from torch import nn

    from ..models.card import ModelCard

ENTRY_POINT_GROUP = "peftadapt.methods"
#: the learning rate of a method that does not set its own (tuned for low-rank factors that start at zero)
DEFAULT_LR = 2e-3
#: what a run starts from, in words, when its method changes nothing before training (adapters start as identity)
SOURCE_START = "the source model"


class MethodError(InputError):
    """A request a method cannot take; the message names the method and the field."""


_REGISTRY: dict[str, type["MethodConfig"]] = {}


def register_method(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    """Class decorator: make a method available by its `name` to every front-end and the worker."""
    if not cls.name or not cls.label:
        raise TypeError(f"{cls.__name__}: a method needs a `name` and a one-line `label`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"method '{cls.name}' is registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


@dataclass
class Cases:
    """What a method trains and audits on (the worker's loaded cases, or the request's case specs)."""

    support: list
    audit: list
    source: list = field(default_factory=list)


@dataclass
class BuildContext:
    """What `build` sees: the network to adapt (in place), its card and size, the run's settings and its data."""

    network: "nn.Module"
    card: "ModelCard"
    total: int  # the base model's parameters
    lr: float
    steps: int
    patches_per_step: int
    seed: int
    device: str
    cases: Cases
    emit: Any = None  # event sink (events of the build itself, e.g. the ESH's training)


@dataclass
class Plan:
    """What `build` returns: training hooks, optional objective/scorer (default: supervised patches, audit Dice),
    the rank and budget used, `info` for the `started` event (e.g. `rank_reason`: how the rank was chosen), and
    `start`: what the run starts from, in words (a method that changes the model before training says how)."""

    hooks: list = field(default_factory=list)
    objective: Any = None
    scorer: Any = None
    rank: int | None = None
    budget: int | None = None
    info: dict = field(default_factory=dict)
    start: str = SOURCE_START


@dataclass
class MethodConfig:
    """Base of every method's settings. Subclasses are dataclasses decorated with `@register_method`."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    #: valid ranks (empty: the method takes no rank) and the rank used when neither rank nor budget decides
    ranks: ClassVar[tuple[int, ...]] = ()
    default_rank: ClassVar[int | None] = None
    takes_budget: ClassVar[bool] = False
    #: False: trains on unlabelled target volumes (labels of support cases are ignored, audit is optional)
    needs_labels: ClassVar[bool] = True
    #: False: starts from the source model only (a re-adapt from an earlier adapter is refused)
    warm_startable: ClassVar[bool] = True
    default_lr: ClassVar[float] = DEFAULT_LR

    rank: int | None = None
    budget: Budget | None = None

    def __post_init__(self):
        self.budget = Budget.from_dict(self.budget, f"method '{self.name}': field 'budget'")
        if self.rank is not None:
            if not self.ranks:
                instead = "; give a parameter budget instead" if self.takes_budget else ": it trains a fixed set of parameters"
                raise MethodError(f"method '{self.name}' takes no rank (field 'rank'){instead}")
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank not in self.ranks:
                raise MethodError(f"method '{self.name}': rank {self.rank!r} is not one of "
                                  f"{', '.join(map(str, self.ranks))} (field 'rank')")
        if self.budget is not None and not self.takes_budget:
            size = (f"its size is set by its rank (field 'rank', {self.default_rank} by default)" if self.ranks
                    else "it trains a fixed set of parameters")
            raise MethodError(f"method '{self.name}' takes no parameter budget (field 'budget'): {size}")

    def to_dict(self) -> dict:
        data = {"name": self.name}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            data[item.name] = value.to_dict() if isinstance(value, Budget) else value
        return data

    def check_cases(self, cases: Cases, where: str = "job") -> None:
        """Refuse data this method cannot train on (one line naming the role). Case objects need `.label`."""
        if not cases.support:
            raise MethodError(f"{where}: no training case (support); method '{self.name}' needs at least one")
        if self.needs_labels:
            unlabelled = [i for i, case in enumerate(cases.support) if not case.label]
            if unlabelled:
                raise MethodError(f"{where}: support case {unlabelled[0]} has no label; method '{self.name}' trains "
                                  "on annotated volumes (label-free adapts without them)")
        if any(not case.label for case in cases.audit):
            raise MethodError(f"{where}: an audit case has no label; audit volumes need their annotation")
        if cases.source and self.needs_labels:
            raise MethodError(f"{where}: source cases are for label-free adaptation only (method '{self.name}')")

    def resolved_budget(self, card_extra: dict | None = None) -> Budget:
        return self.budget if self.budget is not None else default_budget(card_extra)

    def build(self, context: BuildContext) -> Plan:  # pragma: no cover - every method implements it
        raise NotImplementedError


def method_names() -> list[str]:
    _load_plugins()
    return list(_REGISTRY)


def method_class(name: str) -> type[MethodConfig]:
    _load_plugins()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method '{name}' (field 'method'); choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_method(name: str, **fields) -> MethodConfig:
    """A validated method config; fields the method does not have are refused by name."""
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise MethodError(f"method '{name}' has no setting '{unknown[0]}' (it takes: {', '.join(sorted(known))})")
    return cls(**fields)


def method_from_dict(data: Any, where: str = "method") -> MethodConfig:
    if not isinstance(data, dict) or "name" not in data:
        raise MethodError(f"{where}: expected an object with a 'name', got {data!r}")
    fields = {k: v for k, v in data.items() if k != "name"}
    return make_method(data["name"], **fields)


_plugins_loaded = False


def _load_plugins() -> None:
    """Built-in methods are the modules of this package; others come from the `peftadapt.methods` entry points."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    from .. import methods

    for module in pkgutil.iter_modules(methods.__path__):
        if module.name not in ("base", "budget"):
            importlib.import_module(f"{methods.__name__}.{module.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
