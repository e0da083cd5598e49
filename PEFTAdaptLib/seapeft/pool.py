"""The adapter pool: every site of a model × every family, each unit created **inactive** with its exact cost.

Sites are layers. For a CNN: every Conv/ConvTranspose/Linear (weight sites) and every normalisation layer. For a
transformer (a model with attention `qkv`/`query`/`key`/`value` projections) the Linear sites are restricted to the
attention input projections and the MLP layers, as in the reference's `attn_qkv` and `ffn` sites; convolutions
(patch embedding, decoder) and norms stay sites. A fused `qkv` projection also takes LoRA on its query and value
rows alone (`lora_qv`, MED-PEFT's choice for ViTs). Families are built only from the adapter kinds registered in
`UNIT_TYPES` at call time, so the pool grows with the adapter library.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..adapters import add_units
from ..adapters.base import CONV_TYPES, NORM_TYPES, UNIT_TYPES, WEIGHT_TYPES, AdaptedLayer, base_layer_names
from ..errors import PEFTAdaptError

PREFIX = "sea_"  # unit names inside a layer: sea_<family>_<variant>
QKV_NAMES = {"qkv", "q", "k", "v", "query", "key", "value", "to_qkv", "to_q", "to_k", "to_v", "in_proj", "qkv_proj",
             "q_proj", "k_proj", "v_proj"}
FUSED_QKV_NAMES = {"qkv", "to_qkv", "qkv_proj"}  # one Linear for query, key and value rows, in that order
MLP_NAMES = {"fc1", "fc2", "linear1", "linear2", "lin1", "lin2", "w1", "w2", "up_proj", "down_proj"}


@dataclass(frozen=True)
class PoolUnit:
    name: str  # "layer::unit", the key of the unit's gate
    site: str  # the layer's module name
    site_kind: str  # conv | conv_transpose | linear | attn_qkv | mlp | norm
    family: str  # lora | lora_qv | convlora | salt | adaptformer | norm_affine | bitfit | dense
    kind: str  # the adapter kind in UNIT_TYPES
    unit: str  # the unit's name inside its layer
    rank: int  # LoRA/ConvLoRA rank, SALT residual rank, AdaptFormer bottleneck; 0 where none
    cost: int  # exact trainable parameters

    @property
    def key(self) -> str:
        """At most one unit per layer is active: a dense delta contains every additive unit of its layer, and two
        units on one layer (LoRA r2 + ConvLoRA, or LoRA + BitFit) spend budget on overlapping directions."""
        return self.site

    def describe(self) -> dict:
        return {"unit": self.name, "site": self.site, "site_kind": self.site_kind, "family": self.family,
                "kind": self.kind, "rank": self.rank, "cost": self.cost}


def _base(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base if isinstance(module, AdaptedLayer) else module


def is_transformer(model: nn.Module) -> bool:
    return any(isinstance(_base(model, n), nn.Linear) and n.rsplit(".", 1)[-1] in QKV_NAMES
               for n in base_layer_names(model, (nn.Linear,)))


def site_kinds(model: nn.Module, transformer: bool | None = None) -> dict[str, str]:
    """Every site of `model` and its kind (see the module docstring)."""
    transformer = is_transformer(model) if transformer is None else transformer
    sites: dict[str, str] = {}
    for name in base_layer_names(model, WEIGHT_TYPES):
        layer, leaf = _base(model, name), name.rsplit(".", 1)[-1]
        if isinstance(layer, nn.Linear):
            if leaf in QKV_NAMES:
                sites[name] = "attn_qkv"
            elif leaf in MLP_NAMES or ".mlp." in f".{name}.":
                sites[name] = "mlp"
            elif not transformer:
                sites[name] = "linear"
        else:
            sites[name] = "conv" if isinstance(layer, CONV_TYPES) else "conv_transpose"
    for name in base_layer_names(model, NORM_TYPES):
        sites[name] = "norm"
    return sites


@dataclass(frozen=True)
class Family:
    """A family of units: its adapter kind, its variants (unit suffix, rank, config) and where it may go."""

    name: str
    kind: str
    variants: Callable[["SeaPoolOptions"], list[tuple[str, int, object]]]
    sites: tuple[str, ...]
    accepts: Callable[[str, nn.Module], bool] = lambda site, layer: True


@dataclass(frozen=True)
class SeaPoolOptions:
    lora_ranks: Sequence[int] = (1, 2, 4)
    convlora_ranks: Sequence[int] = (1,)
    adaptformer_bottlenecks: Sequence[int] = (4, 8)
    salt_lora_rank: int = 2


def _cubic_kernel(site: str, layer: nn.Module) -> bool:
    kernel = layer.weight.shape[2:]
    return len(set(kernel)) == 1 and kernel[0] > 1  # a 1×1 ConvLoRA is LoRA r1: no new function


def _fused_qkv(site: str, layer: nn.Module) -> bool:
    from ..adapters.qkv_lora import is_fused_qkv

    return site.rsplit(".", 1)[-1] in FUSED_QKV_NAMES and is_fused_qkv(layer)


def _families() -> list[Family]:
    from ..adapters import (
        AdaptFormerConfig, BitFitConfig, ConvLoRAConfig, DenseConfig, LoRAConfig, NormAffineConfig, QKVLoRAConfig,
        SALTConfig,
    )

    weight_sites = ("conv", "conv_transpose", "linear", "attn_qkv", "mlp")
    return [
        Family("lora", "lora", lambda o: [(f"r{r}", r, LoRAConfig(r=r, alpha=r)) for r in o.lora_ranks], weight_sites),
        Family("lora_qv", "lora_qkv",
               lambda o: [(f"r{r}", r, QKVLoRAConfig(r=r, alpha=r, parts="qv")) for r in o.lora_ranks], ("attn_qkv",),
               _fused_qkv),
        Family("convlora", "convlora",
               lambda o: [(f"r{r}", r, ConvLoRAConfig(r=r, alpha=r)) for r in o.convlora_ranks], ("conv",),
               _cubic_kernel),
        Family("salt", "salt", lambda o: [(f"r{o.salt_lora_rank}", o.salt_lora_rank,
                                           SALTConfig(ratio=0.1, lora_rank=o.salt_lora_rank))], weight_sites),
        Family("adaptformer", "adaptformer",
               lambda o: [(f"b{b}", b, AdaptFormerConfig(bottleneck=b)) for b in o.adaptformer_bottlenecks],
               ("linear", "attn_qkv", "mlp")),
        Family("norm_affine", "norm_affine", lambda o: [("", 0, NormAffineConfig())], ("norm",)),
        Family("bitfit", "bitfit", lambda o: [("", 0, BitFitConfig())], weight_sites),
        Family("dense", "dense", lambda o: [("", 0, DenseConfig())], weight_sites),
    ]


FAMILIES = ("lora", "lora_qv", "convlora", "salt", "adaptformer", "norm_affine", "bitfit", "dense")


def build_pool(
    network: nn.Module,
    families: Sequence[str] = FAMILIES,
    options: SeaPoolOptions = SeaPoolOptions(),
    max_cost: int | None = None,
    transformer: bool | None = None,
) -> list[PoolUnit]:
    """Add every candidate unit to `network`, inactive, and describe the pool.

    Families whose adapter kind is not registered are skipped (the adapter library may be older or newer than this
    module); units costing more than `max_cost` (the budget) are not created, since they could never be chosen.
    """
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise PEFTAdaptError(f"unknown SEA-PEFT families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    sites = site_kinds(network, transformer)
    pool: list[PoolUnit] = []
    for family in _families():
        if family.name not in families or family.kind not in UNIT_TYPES:
            continue
        unit_class = UNIT_TYPES[family.kind]
        for suffix, rank, config in family.variants(options):
            unit_name = PREFIX + family.name + (f"_{suffix}" if suffix else "")
            for site, kind in sites.items():
                layer = _base(network, site)
                if (kind not in family.sites or not isinstance(layer, unit_class.layer_types)
                        or not family.accepts(site, layer)):
                    continue
                cost = unit_class(layer, config).num_trainable()
                if cost <= 0 or (max_cost is not None and cost > max_cost):
                    continue
                add_units(network, config, unit_class, unit_name, active=False, layers=[site])
                pool.append(PoolUnit(f"{site}::{unit_name}", site, kind, family.name, family.kind, unit_name, rank,
                                     cost))
    if not pool:
        raise PEFTAdaptError("SEA-PEFT found no adapter unit that fits this model and budget")
    return pool

