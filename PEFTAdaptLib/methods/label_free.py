"""Label-free adaptation: ConvLoRA + AdaBN self-training against an early segmentation head, for target volumes
without annotation (docs/labelfree.md). Audit cases, if any, are scored for the user and never select."""
from __future__ import annotations

from dataclasses import dataclass

from .base import SOURCE_START, BuildContext, Cases, MethodConfig, MethodError, Plan, register_method

#: ESH training steps: the run's steps, at most this many (the head is small; it converges quickly)
MAX_ESH_STEPS = 60
NORMS = ("auto", "adabn", "affine", "none")
#: the step-0 state with AdaBN units: their statistics are re-estimated on the target before the first score
ADABN_START = "the source model with its batch-norm statistics re-estimated on the target (AdaBN)"


@register_method
@dataclass
class LabelFree(MethodConfig):
    name = "label-free"
    label = "Label-free: self-training on unannotated target volumes (ConvLoRA + AdaBN)"
    ranks = (1, 2, 4, 8)
    default_rank = 2  # the paper's
    needs_labels = False
    warm_startable = False
    default_lr = 1e-3

    #: the adapters: ConvLoRA on the stages the ESH reads (or not), and what the norms get — "auto": AdaBN on
    #: BatchNorm + norm-affine on the others; "adabn", "affine" or "none" (ablations)
    convlora: bool = True
    norm: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in NORMS:
            raise MethodError(f"method '{self.name}': norm '{self.norm}' is not one of {', '.join(NORMS)} (field 'norm')")
        if not isinstance(self.convlora, bool):
            raise MethodError(f"method '{self.name}': convlora must be true or false (field 'convlora')")
        if not self.convlora and self.rank is not None:
            raise MethodError(f"method '{self.name}': a rank is for ConvLoRA, which is off (fields 'rank', 'convlora')")

    def check_cases(self, cases: Cases, where: str = "job") -> None:
        super().check_cases(cases, where)
        if any(not case.label for case in cases.source):
            raise MethodError(f"{where}: a source case has no label; source-like cases train the early "
                              "segmentation head from their annotation")

    def build(self, context: BuildContext) -> Plan:
        from ..labelfree import LabelFreeConfig, build_label_free

        rank = self.rank or self.default_rank
        config = LabelFreeConfig(rank=rank, convlora=self.convlora, norm=self.norm,
                                 patches_per_step=context.patches_per_step,
                                 esh_steps=min(MAX_ESH_STEPS, context.steps), seed=context.seed,
                                 device=context.device)
        cases = context.cases
        parts = build_label_free(context.network, context.card, cases.support, config, cases.source, cases.audit)
        reason = f"rank {rank}: " + ("given" if self.rank else "the method's default (the paper's)")
        return Plan(hooks=[parts.start], objective=parts.objective, scorer=parts.scorer, rank=rank,
                    info={**parts.info, "rank_reason": reason},
                    start=ADABN_START if parts.info["adabn"] else SOURCE_START)
