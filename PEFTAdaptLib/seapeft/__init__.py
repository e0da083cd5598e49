"""SEA-PEFT: search → audit → allocate adapter units under a binding parameter budget while training."""
from .allocator import SeaPeftConfig, SeaPeftHook
from .pool import PoolUnit, build_pool

__all__ = ["PoolUnit", "SeaPeftConfig", "SeaPeftHook", "build_pool"]
