"""Weight-space adapter machinery shared by every adapter type.

An `AdapterUnit` is one trainable transform of one layer's parameters, (W, b) -> (W', b'). An `AdaptedLayer` wraps
a frozen Linear / ConvNd / ConvTransposeNd and runs it with the composition of its *active* units, through
`torch.func.functional_call`, so one layer can hold several units (an allocator's pool) and each can be switched off
without losing its trained weights. Weight-space form costs one small matrix product per layer per step, merges for
free and works for any layer type whose forward reads `weight`/`bias` (see peft-methods.md §7 for measurements).

A `LowRankUnit` gives its update as factors, ΔW = P Q: where the layer allows it and it is cheaper, the layer then
trains them without the dense weight gradient (`lowrank.py`), the forward still being one call with the composed
weight.
"""
from __future__ import annotations

import fnmatch
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from .lowrank import Factors, factored_forward, factored_is_cheaper, fold, product_forward, product_is_cheaper

#: layer types whose weight can be adapted
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.LayerNorm,
)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ADAPTABLE_TYPES = WEIGHT_TYPES + NORM_TYPES
#: tensors of a layer a unit may transform (parameters, and the running statistics of batch norms)
LAYER_TENSORS = ("weight", "bias", "running_mean", "running_var")

UNIT_TYPES: dict[str, type["AdapterUnit"]] = {}


@dataclass
class AdapterConfig:
    """Fields every adapter type shares: which layers it goes on (fnmatch patterns over module names)."""

    target_modules: Sequence[str] = ("*",)
    exclude_modules: Sequence[str] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> "AdapterConfig":
        """The config saved values describe (an adapter.json is untrusted data): an unknown field, or a value not
        of its field's type (a string or NaN where a rank or scale belongs), is a TypeError naming the field,
        rather than a failure deep inside a unit or, worse, a unit built from it."""
        if not isinstance(values, Mapping):
            raise TypeError(f"config is a {type(values).__name__}, not an object of fields")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise TypeError(f"unknown config field(s) {', '.join(map(repr, unknown))}")
        for key, value in values.items():
            if not _is_of(value, hints[key]):
                raise TypeError(f"config field '{key}' must be {_type_name(hints[key])}, not {str(value)[:40]!r}")
        return cls(**values)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.target_modules) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude_modules
        )


def _is_of(value, hint) -> bool:
    """Whether a JSON value fits a config field's annotation; numbers must be finite, and a bool is no number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_of(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        number = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is not None and args:  # Sequence[str] and the like: a JSON list
        return isinstance(value, (list, tuple)) and all(_is_of(item, args[0]) for item in value)
    return True  # a type this check does not know: the unit's own checks decide


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if hint is type(None):
        return "null"
    if args:
        return f"a list of {_type_name(args[0])}"
    return {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


class AdapterUnit(nn.Module):
    """One adapter on one layer. Subclasses set `kind`, `config_class` and implement `apply`."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: additive units (W + ΔW) commute; non-additive ones (SALT, SVD) run first, on the base weight
    additive: ClassVar[bool] = True
    #: the layer types this unit can go on
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = WEIGHT_TYPES
    #: False for output-space units (AdaptFormer): they add to the layer's output and cannot merge into weights
    mergeable: ClassVar[bool] = True
    #: the unit's learning rate relative to the run's, which is tuned for low-rank factors that start at zero;
    #: a dense delta (full fine-tuning of a layer) needs smaller steps (MED-PEFT's baselines: full fine-tuning at
    #: 0.1× the LoRA rate; on our spine shift 1/3 was best of 1/6, 1/3, 1: docs/seapeft.md)
    lr_scale: ClassVar[float] = 1.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            UNIT_TYPES[cls.kind] = cls

    def __init__(self, layer: nn.Module, config: AdapterConfig):
        super().__init__()
        self.config = config

    def apply(self, params: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Weight-space units transform the layer's tensors; output-space units return them unchanged."""
        return params

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Output-space units add to the layer's output; weight-space units leave it."""
        return y

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LowRankUnit(AdapterUnit):
    """A weight-space unit whose trained update is a product of factors, ΔW = P Q in the layer's (shape[0], rest)
    matricisation (plus, at most, a fixed change of the weight)."""

    #: True where the unit's factors live in a fixed basis of the base weight, W = P₀ Q₀ (SALT, SVD: U Σ, Vᵀ), and
    #: `whole` gives the adapted weight itself in it
    has_basis: ClassVar[bool] = False

    def split(self, params: dict[str, torch.Tensor | None]) -> tuple[dict[str, torch.Tensor | None], Factors]:
        """(params with the fixed part of the update applied, (P, Q))."""
        raise NotImplementedError

    def whole(self) -> Factors:
        """The base weight with this unit's update, as factors (P, Q) with Q the fixed basis (`has_basis` units)."""
        raise NotImplementedError

    def apply(self, params):
        params, factors = self.split(params)
        return {**params, "weight": fold(params["weight"], [factors])}


@dataclass
class UnitRecord:
    """Where a unit lives: `layer` is the module name in the model, `name` the unit's key inside the layer."""

    layer: str
    name: str
    unit: AdapterUnit = field(repr=False)
    owner: "AdaptedLayer" = field(repr=False)

    @property
    def active(self) -> bool:
        return self.owner.is_active(self.name)


class AdaptedLayer(nn.Module):
    """A frozen layer plus named adapter units; forward uses the composition of the active ones."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.units = nn.ModuleDict()
        self._active: dict[str, bool] = {}
        self._original: dict[str, torch.Tensor] | None = None  # base tensors saved by merge()

    # -- units ---------------------------------------------------------------------------------------------------
    def add_unit(self, name: str, unit: AdapterUnit, active: bool = True) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before adding adapter units")
        if name in self.units:
            raise ValueError(f"adapter unit '{name}' already exists on this layer")
        self.units[name] = unit
        self._active[name] = active

    def is_active(self, name: str) -> bool:
        return self._active[name]

    def set_active(self, name: str, active: bool) -> None:
        """Gate a unit on or off; its trained weights are kept either way."""
        if self.merged:
            raise RuntimeError("unmerge() before toggling adapter units")
        self._active[name] = bool(active)

    def active_units(self) -> list[AdapterUnit]:
        units = [u for n, u in self.units.items() if self._active[n]]
        return [u for u in units if not u.additive] + [u for u in units if u.additive]

    # -- forward -------------------------------------------------------------------------------------------------
    def base_params(self) -> dict[str, torch.Tensor | None]:
        return {key: getattr(self.base, key, None) for key in LAYER_TENSORS if hasattr(self.base, key)}

    def _compose(self, units: Sequence[AdapterUnit]) -> tuple[dict[str, torch.Tensor | None], dict[AdapterUnit, Factors]]:
        """The layer's tensors with every unit applied, low-rank updates kept apart as factors."""
        params, factors = self.base_params(), {}
        for unit in units:
            if isinstance(unit, LowRankUnit):
                params, factors[unit] = unit.split(params)
            else:
                params = unit.apply(params)
        return params, factors

    def effective_params(self) -> dict[str, torch.Tensor | None]:
        params, factors = self._compose(self.active_units())
        return {**params, "weight": fold(params["weight"], factors.values())} if factors else params

    def _factorable(self, weight: torch.Tensor, factors: dict[AdapterUnit, Factors]) -> bool:
        """Whether the factors may be trained without the dense weight gradient: only when nothing needs that
        gradient anyway, on a plain torch layer (a subclass may override the forward) with numeric padding (a
        string may be asymmetric) and no hooks on it (they would not see the call)."""
        base = self.base
        return (bool(factors) and torch.is_grad_enabled() and not weight.requires_grad
                and any(t.requires_grad for pair in factors.values() for t in pair)
                and type(base) in WEIGHT_TYPES and not isinstance(getattr(base, "padding", 0), str)
                and not (base._forward_hooks or base._forward_pre_hooks))

    def _basis(self, weight: torch.Tensor, factors: dict[AdapterUnit, Factors]) -> LowRankUnit | None:
        """The layer's one unit with a basis (SALT, SVD), if the weight it would run on is still the base weight
        that basis is of: the product form then runs the whole layer in that basis."""
        with_basis = [unit for unit in factors if unit.has_basis]
        return with_basis[0] if len(with_basis) == 1 and weight is self.base.weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self.active_units()
        if self.merged or not units:
            return self.base(x)
        params, factors = self._compose(units)
        weight, bias = params["weight"], params.get("bias")
        factorable = self._factorable(weight, factors)
        basis = self._basis(weight, factors) if factorable else None
        rank = sum(p.shape[1] for p, _ in factors.values())
        if basis is not None and product_is_cheaper(self.base, rank, x.device):
            rest = [pair for unit, pair in factors.items() if unit is not basis]
            y = product_forward(self.base, x, bias, basis.whole(), rest)
        elif factorable and factored_is_cheaper(self.base, rank, x.device):
            y = factored_forward(self.base, x, weight, bias, list(factors.values()))
        else:
            params["weight"] = fold(weight, factors.values())
            y = functional_call(self.base, {k: v for k, v in params.items() if v is not None}, (x,))
        for unit in units:
            y = unit.adapt_output(x, y)
        return y

    # -- merge ---------------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._original is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapted weights into the base layer (plain inference speed); unmerge() restores them exactly."""
        if self.merged:
            return
        blocking = [n for n, u in self.units.items() if self._active[n] and not u.mergeable]
        if blocking:
            raise RuntimeError(f"active units {blocking} act on the output and cannot be merged into the weights")
        effective = self.effective_params()
        self._original = {k: v.detach().clone() for k, v in self.base_params().items() if v is not None}
        for key, value in effective.items():
            if value is None:
                continue
            if getattr(self.base, key) is None:  # a unit added a bias the base layer lacked
                setattr(self.base, key, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                getattr(self.base, key).copy_(value)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for key in LAYER_TENSORS:
            if key in self._original:
                getattr(self.base, key).copy_(self._original[key])
            elif getattr(self.base, key, None) is not None:  # a unit had added it (e.g. an affine on a plain norm)
                setattr(self.base, key, None)
        self._original = None


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered: a module can sit under several names (nnU-Net's conv blocks hold
    their convolution as `conv` and as `all_modules.0`, and run the latter), and replacing one name only would leave
    the forward on the plain layer."""
    places = [(parent, key) for parent in model.modules() for key, child in parent._modules.items() if child is old]
    for parent, key in places:
        setattr(parent, key, new)


def base_layer_names(model: nn.Module, types: tuple[type[nn.Module], ...] = ADAPTABLE_TYPES) -> list[str]:
    """Names of adaptable layers of `types`, as named in the un-adapted model (AdaptedLayer's `.base` hidden)."""
    names = []
    for name, module in model.named_modules():
        if ".units." in f".{name}." or name.endswith(".base"):
            continue
        layer = module.base if isinstance(module, AdaptedLayer) else module
        if isinstance(layer, types):
            names.append(name)
    return names


def add_units(
    model: nn.Module,
    config: AdapterConfig,
    unit_class: type[AdapterUnit],
    name: str,
    active: bool = True,
    layers: Sequence[str] | None = None,
) -> list[UnitRecord]:
    """Put one `unit_class` unit named `name` on every matching layer (or on the given `layers`)."""
    names = base_layer_names(model, unit_class.layer_types)
    chosen = [n for n in names if (n in layers if layers is not None else config.matches(n))]
    return [attach_unit(model, layer_name, name, build_unit(model, layer_name, config, unit_class), active)
            for layer_name in chosen]


def build_unit(model: nn.Module, layer_name: str, config: AdapterConfig,
               unit_class: type[AdapterUnit]) -> AdapterUnit:
    """A unit for the layer `layer_name`, on that layer's device but not yet attached to it: building is where a
    unit checks its config against the layer, so a refusal here leaves the network as it was."""
    module = model.get_submodule(layer_name)
    base = module.base if isinstance(module, AdaptedLayer) else module
    tensors = list(base.parameters()) + list(base.buffers())
    return unit_class(base, config).to(tensors[0].device if tensors else "cpu")


def attach_unit(model: nn.Module, layer_name: str, name: str, unit: AdapterUnit, active: bool = True) -> UnitRecord:
    """Put a built unit on its layer, wrapping (and freezing) the plain layer in an AdaptedLayer the first time."""
    module = model.get_submodule(layer_name)
    if not isinstance(module, AdaptedLayer):
        for p in module.parameters():
            p.requires_grad_(False)
        plain, module = module, AdaptedLayer(module)
        _replace_module(model, plain, module)
    module.add_unit(name, unit, active=active)
    return UnitRecord(layer_name, name, unit, module)


def iter_units(model: nn.Module) -> Iterator[UnitRecord]:
    for layer_name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            for unit_name, unit in module.units.items():
                yield UnitRecord(layer_name, unit_name, unit, module)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def freeze_base(model: nn.Module) -> None:
    """Make only adapter units trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for record in iter_units(model):
        for p in record.unit.parameters():
            p.requires_grad_(True)


def train_units(model: nn.Module) -> None:
    """Training mode for the adapter units, the frozen model's norms with running statistics (batch norms, instance
    norms that track them) kept on those statistics as at inference: in training mode they would follow the training
    patches, and the job would audit and segment with statistics that the adapter does not hold (a unit that holds
    some, AdaBN's, keeps them as estimated)."""
    model.train()
    for module in model.modules():
        if getattr(module, "running_mean", None) is not None:
            module.eval()


def trainable_parameters(model: nn.Module, active_only: bool = True) -> list[nn.Parameter]:
    return [p for r in iter_units(model) if r.active or not active_only for p in r.unit.parameters()]


def parameter_groups(model: nn.Module, lr: float) -> list[dict]:
    """Every unit's parameters (active or not) in optimizer groups by learning rate (`lr` × the unit's scale)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for record in iter_units(model):
        groups.setdefault(record.unit.lr_scale, []).extend(record.unit.parameters())
    return [{"params": params, "lr": lr * scale} for scale, params in sorted(groups.items()) if params]


def count_trainable(model: nn.Module, active_only: bool = True) -> int:
    return sum(r.unit.num_trainable() for r in iter_units(model) if r.active or not active_only)


def count_base_parameters(model: nn.Module) -> int:
    unit_params = {id(p) for r in iter_units(model) for p in r.unit.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in unit_params)


def merge_all(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.merge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapted layer and put its plain base layer back in its place: a model with no adapter
    machinery left, running at the base model's speed (for deployment; not reversible)."""
    for _, layer in list(adapted_layers(model)):
        layer.merge()
        _replace_module(model, layer, layer.base)
    return model


def unmerge_all(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()
