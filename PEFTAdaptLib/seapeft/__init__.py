"""SEA-PEFT: search → audit → allocate adapter units under a binding parameter budget while training.

`build_sea_peft(network, budget, ...)` adds the pool to a network and returns the training hook; the pieces
(pool, utility, estimate, knapsack, controller, sampler, allocator, audit buffer, hook) are one module each.
"""
from .allocator import Allocator
from .config import SeaPeftConfig
from .hook import SeaPeftHook
from .pool import FAMILIES, PoolUnit, SeaPoolOptions, build_pool, site_kinds


def build_sea_peft(network, config: SeaPeftConfig, options: SeaPoolOptions | None = None) -> SeaPeftHook:
    """Put the whole pool on `network` (inactive; units dearer than the budget are not created) and return the
    hook that allocates it while training."""
    options = options or SeaPoolOptions(lora_ranks=tuple(config.lora_ranks))
    pool = build_pool(network, config.families, options, max_cost=config.budget)
    return SeaPeftHook(network, pool, config)


__all__ = ["Allocator", "FAMILIES", "PoolUnit", "SeaPeftConfig", "SeaPeftHook", "SeaPoolOptions", "build_pool",
           "build_sea_peft", "site_kinds"]
