"""SEA-PEFT: adapter units chosen while training, under a binding parameter budget (docs/seapeft.md)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BuildContext, MethodConfig, Plan, register_method


@register_method
@dataclass
class SeaPeft(MethodConfig):
    name = "sea-peft"
    label = "SEA-PEFT: adapters chosen automatically while training, within the parameter budget"
    takes_budget = True

    def build(self, context: BuildContext) -> Plan:
        from ..seapeft import SeaPeftConfig, build_sea_peft

        budget = self.resolved_budget(context.card.extra)
        count = budget.parameters(context.total)
        config = SeaPeftConfig.for_steps(count, context.steps, train_patches=context.patches_per_step,
                                         lr=context.lr, seed=context.seed)
        hook = build_sea_peft(context.network, config)
        whose = "the model's default budget" if self.budget is None else "budget"
        return Plan(hooks=[hook], budget=count, info={"budget_reason": f"{whose}: {budget.describe(context.total)}"})
