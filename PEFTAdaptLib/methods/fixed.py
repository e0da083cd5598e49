"""Fixed topologies: one adapter type on every layer it can go on. With a rank, the rank is the user's if given,
else the largest that fits the budget (the user's, or the model's default); the plan says which and why."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BuildContext, MethodConfig, MethodError, Plan


@dataclass
class FixedMethod(MethodConfig):
    #: the units' name inside each adapted layer (adapter.json, the allocation table)
    unit_name: ClassVar[str] = ""

    def adapter_config(self, rank: int | None):
        raise NotImplementedError

    def choose_rank(self, context: BuildContext) -> tuple[int | None, int | None, str]:
        """(rank, budget in parameters, how the rank was chosen); methods without a rank adapt fixed parameters."""
        return None, None, ""

    def target_layers(self, network) -> list[str]:
        """The layers the units go on: every layer of the unit's types that the config's patterns match."""
        from ..adapters import unit_class_for
        from ..adapters.base import base_layer_names

        config = self.adapter_config(self.default_rank)
        return [n for n in base_layer_names(network, unit_class_for(config).layer_types) if config.matches(n)]

    def build(self, context: BuildContext) -> Plan:
        from ..adapters import add_units, unit_class_for

        rank, budget, reason = self.choose_rank(context)
        config = self.adapter_config(rank)
        layers = self.target_layers(context.network)
        if not layers:
            raise MethodError(f"method '{self.name}': no layer of this model can take it")
        add_units(context.network, config, unit_class_for(config), self.unit_name, layers=layers)
        return Plan(rank=rank, budget=budget, info={"rank_reason": reason} if reason else {})


RANKS = (1, 2, 4, 8, 16, 32)


@dataclass
class RankedMethod(FixedMethod):
    """A low-rank adapter on every weight layer; the budget decides the rank unless the user gave one."""

    ranks: ClassVar[tuple[int, ...]] = RANKS
    default_rank: ClassVar[int] = 4
    takes_budget: ClassVar[bool] = True

    def unit_cost(self, weight_shape: tuple[int, ...], rank: int) -> int:
        """Trainable parameters of one unit at `rank` on a weight of this shape (0: the layer is skipped)."""
        raise NotImplementedError

    def cost(self, network, rank: int) -> int:
        """Trainable parameters at `rank`, from the layer shapes (no copy of the network, no unit built)."""
        return sum(self.unit_cost(weight_shape(network, name), rank) for name in self.target_layers(network))

    def choose_rank(self, context: BuildContext) -> tuple[int, int | None, str]:
        network, total = context.network, context.total
        if self.rank is not None:
            if self.budget is None:
                return self.rank, None, f"rank {self.rank}: given"
            limit, cost = self.budget.parameters(total), self.cost(network, self.rank)
            if cost > limit:
                raise MethodError(
                    f"method '{self.name}': rank {self.rank} trains {cost:,} parameters, more than the budget of "
                    f"{self.budget.describe(total)} (fields 'rank' and 'budget'); lower the rank, raise the budget, "
                    "or give only one of them")
            return self.rank, limit, (f"rank {self.rank}: given ({cost:,} parameters, within the budget of "
                                      f"{self.budget.describe(total)})")
        budget = self.resolved_budget(context.card.extra)
        limit = budget.parameters(total)
        best = None
        for rank in self.ranks:
            if self.cost(network, rank) > limit:
                break
            best = rank
        whose = "the model's default budget" if self.budget is None else "the budget"
        if best is None:
            raise MethodError(
                f"method '{self.name}': even rank {self.ranks[0]} trains {self.cost(network, self.ranks[0]):,} "
                f"parameters, more than {whose} of {budget.describe(total)} (field 'budget'); raise the budget, "
                "or choose sea-peft, which picks the layers that fit")
        return best, limit, (f"rank {best}: the largest of {', '.join(map(str, self.ranks))} that fits {whose} of "
                             f"{budget.describe(total)}")


def weight_shape(network, name: str) -> tuple[int, ...]:
    from ..adapters.base import AdaptedLayer

    layer = network.get_submodule(name)
    return tuple((layer.base if isinstance(layer, AdaptedLayer) else layer).weight.shape)


def matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a weight matricised as (shape[0], rest), as the low-rank adapters do."""
    columns = 1
    for size in weight_shape[1:]:
        columns *= size
    return weight_shape[0], columns
