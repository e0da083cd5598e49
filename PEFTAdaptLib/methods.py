"""Fixed-topology adaptation methods: which adapter units a method puts on a network."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import ConvLoRAConfig, LoRAConfig, NormAffineConfig, SALTConfig, apply_adapter, count_trainable
from .errors import PEFTAdaptError


@dataclass
class MethodConfig:
    name: str = "lora"
    rank: int = 4
    alpha: float | None = None  # defaults to the rank (scaling 1)
    target_modules: tuple[str, ...] = ("*",)


#: "label-free" needs no labelled support and runs its own loop (PEFTAdaptLib/labelfree, docs/labelfree.md)
METHODS = ("lora", "sea-peft", "salt", "convlora", "norm-affine", "label-free")


RANKS = (1, 2, 4, 8, 16, 32)


def rank_for_budget(network: nn.Module, config: MethodConfig, budget: int) -> int:
    """The largest rank (LoRA, ConvLoRA, SALT residual rank) whose exact trainable-parameter count fits `budget`."""
    import copy

    best = None
    for rank in RANKS:
        trial = copy.deepcopy(network)
        cost = apply_method(trial, MethodConfig(config.name, rank, config.alpha, config.target_modules))
        if cost > budget:
            break
        best = rank
    if best is None:
        raise PEFTAdaptError(f"a budget of {budget:,} parameters is smaller than {config.name} at rank 1 on every "
                             "layer needs; raise the budget or let sea-peft choose the layers")
    return best


def build_method(network: nn.Module, config: MethodConfig, budget: int | None, lr: float, seed: int,
                 steps: int | None = None) -> tuple[int, list]:
    """Add the method's units; return (trainable parameters at start, training hooks). SEA-PEFT puts its whole
    pool on the network (inactive), returns its allocator as a hook and needs a parameter `budget` (a count);
    with the run's `steps` its schedule is scaled to the run and the final configuration sweep runs at the end."""
    if config.name != "sea-peft":
        return apply_method(network, config), []
    from .seapeft import SeaPeftConfig, build_sea_peft

    if budget is None:
        raise PEFTAdaptError("sea-peft needs a parameter budget (a fraction of the model or a count)")
    if steps:
        sea = SeaPeftConfig.for_steps(budget, steps, lr=lr, seed=seed)
    else:  # schedule unknown: the defaults, no final sweep (the trainer's best audited state is the selection)
        sea = SeaPeftConfig(budget=budget, lr=lr, seed=seed)
    return 0, [build_sea_peft(network, sea)]


def apply_method(network: nn.Module, config: MethodConfig) -> int:
    """Add a fixed-topology method's adapter units to `network`; return the number of trainable parameters."""
    configs = {
        "lora": lambda: LoRAConfig(r=config.rank, alpha=config.alpha or config.rank,
                                   target_modules=config.target_modules),
        "salt": lambda: SALTConfig(ratio=0.1, lora_rank=config.rank, target_modules=config.target_modules),
        "convlora": lambda: ConvLoRAConfig(r=config.rank, alpha=config.alpha or config.rank,
                                           target_modules=config.target_modules),
        "norm-affine": lambda: NormAffineConfig(target_modules=config.target_modules),
    }
    if config.name not in configs:
        raise PEFTAdaptError(f"unknown method '{config.name}'; choose one of {', '.join(METHODS)}")
    if not apply_adapter(network, configs[config.name](), config.name.replace("-", "_")):
        raise PEFTAdaptError(f"{config.name}: no layer of this model can take it (patterns {list(config.target_modules)})")
    return count_trainable(network)
