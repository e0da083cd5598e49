"""Label-free adaptation by self-training against an early segmentation head (ConvLoRA + AdaBN, Aleem et al.,
ISBI 2024; docs/labelfree.md).

The network and the ESH are frozen. ConvLoRA goes on the convs of the encoder stages up to the ESH's stage (deeper
stages get no gradient from this loss), AdaBN on every BatchNorm, norm-affine on the other norms of those stages
(instance norm has no statistics to re-estimate). Each step: one forward on target patches; the decoder's argmax,
computed under no_grad, is the pseudo-label; the ESH's output on the adapted early features is trained towards it
(Dice + CE). Only the early features can move, so the decoder's view of the target domain improves through them.
Selection without ground truth: the adapter state whose ESH/decoder agreement (Dice between the two argmaxes on
fixed held target patches) is highest, step 0 (no change) included.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import (
    AdaBNConfig, AdaBNUnit, ConvLoRAConfig, NormAffineConfig, NormAffineUnit, UnitRecord, add_units, apply_adapter,
    estimate_adabn, iter_units,
)
from ..adapters.base import BATCH_NORM_TYPES, NORM_TYPES, base_layer_names
from ..data.cases import Case
from ..errors import PEFTAdaptError
from ..methods.base import MethodError
from ..metrics import dice
from ..models.card import ModelCard
from ..training import PatchSampler, Score, TrainingContext, audit_dice, autocast
from .esh import (
    ESH_SOURCE_CONFIDENT, ESH_SOURCE_LABELLED, EarlySegmentationHead, FeatureTap, build_head, choose_stage,
    stages_up_to, train_head,
)
from .loss import masked_dice_ce
from .patches import TargetPatches

#: the held agreement patches come from their own random stream (seed + 1), not from this run's training draws
HELD_SEED_OFFSET = 1


@dataclass
class LabelFreeConfig:
    rank: int = 2  # the paper's r = 2, alpha = 2 (scaling 1)
    alpha: float | None = None  # defaults to the rank
    factorisation: str = "paper"  # ConvLoRAConfig: "paper" or "peft"
    convlora: bool = True
    #: "auto": AdaBN on BatchNorm + norm-affine on the adapted stages' other norms; "adabn", "affine" or "none"
    norm: str = "auto"
    stage: str | None = None  # ESH stage override (a module name); None: encoder stage `stage_index`
    stage_index: int = 1
    esh_steps: int = 60
    esh_lr: float = 1e-3
    confidence: float = 0.9  # softmax max above which a decoder voxel may train the ESH (no labelled source)
    patches_per_step: int = 2
    held_patches: int = 4
    adabn_batches: int = 8
    seed: int = 0
    device: str = "cpu"


def _stage_patterns(stages: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for s in stages for p in (s, f"{s}.*"))


def attach_adapters(network: nn.Module, stages: Sequence[str], config: LabelFreeConfig) -> list[UnitRecord]:
    """ConvLoRA on the stages' convs; AdaBN on every BatchNorm of the network; norm-affine where it applies."""
    patterns = _stage_patterns(stages)
    records: list[UnitRecord] = []
    if config.convlora:
        records += apply_adapter(network, ConvLoRAConfig(r=config.rank, alpha=config.alpha or config.rank,
                                                         factorisation=config.factorisation,
                                                         target_modules=patterns), "convlora")
    if config.norm in ("auto", "adabn"):
        records += apply_adapter(network, AdaBNConfig(), "adabn")
    if config.norm in ("auto", "affine"):
        affine = NormAffineConfig(target_modules=patterns)
        exclude = set(base_layer_names(network, BATCH_NORM_TYPES)) if config.norm == "auto" else set()
        layers = [n for n in base_layer_names(network, NORM_TYPES) if affine.matches(n) and n not in exclude]
        records += add_units(network, affine, NormAffineUnit, "norm_affine", layers=layers)
    return records


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """Hard decoder pseudo-labels, detached: the ESH loss must not reach the decoder. With a gradient path (the
    reference code's undetached soft targets) the loss also pulls the decoder's output towards the ESH — the two
    can then agree by both degrading, a shortcut that raises agreement without improving the features."""
    return logits.detach().argmax(dim=1)


def self_training_loss(network: nn.Module, head: EarlySegmentationHead, tap: FeatureTap,
                       image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Dice + CE between the ESH output and the decoder's pseudo-labels, the pseudo-labels) for one batch."""
    logits = network(image)
    target = pseudo_labels(logits)
    return masked_dice_ce(head(tap.features, image.shape[2:]), target), target


class SelfTrainingObjective:
    """One step: random target patches; the ESH's output on the adapted early features is trained towards the
    decoder's pseudo-labels."""

    def __init__(self, head: EarlySegmentationHead, tap: FeatureTap, sampler: TargetPatches):
        self.head, self.tap, self.sampler = head, tap, sampler

    def loss(self, network: nn.Module, device: torch.device) -> torch.Tensor:
        image = self.sampler().to(device)
        with autocast(device):
            loss, _ = self_training_loss(network, self.head, self.tap, image)
        return loss

    def state_dict(self) -> dict:
        return {"targets": self.sampler.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.rng.bit_generator.state = state["targets"]


class AgreementScorer:
    """Selection without ground truth: foreground Dice between the ESH's and the decoder's argmax over fixed held
    target patches. With reference cases, their Dice is reported beside it (evaluation only, never selects)."""

    event, key = "agreement", "agreement"

    def __init__(self, head: EarlySegmentationHead, tap: FeatureTap, held: Sequence[torch.Tensor], card: ModelCard,
                 reference: Sequence[Case], device: str):
        self.head, self.tap, self.held, self.card = head, tap, list(held), card
        self.reference, self.device = list(reference), device

    @torch.no_grad()
    def agreement(self, network: nn.Module) -> float:
        network.eval()
        esh, decoder = [], []
        for image in self.held:
            logits = network(image)
            decoder.append(logits.argmax(1).cpu().numpy())
            esh.append(self.head(self.tap.features, image.shape[2:]).argmax(1).cpu().numpy())
        esh_all, decoder_all = np.concatenate(esh), np.concatenate(decoder)
        return float(np.mean([dice(esh_all == c, decoder_all == c) for c in range(1, self.card.num_classes)]))

    def __call__(self, network: nn.Module) -> Score:
        agreement = self.agreement(network)
        fields = {"agreement": agreement}
        if self.reference:
            fields["dice"] = audit_dice(network, self.reference, self.card, self.device)
        return Score(agreement, fields)

    def judge(self, score: Score, baseline: Score) -> None:
        return None  # no reference to test a gain against: the highest agreement wins


def set_units_active(network: nn.Module, active: bool) -> None:
    for record in iter_units(network):
        record.owner.set_active(record.name, active)


class LabelFreeStart:
    """Before the step-0 score: fit the ESH on the unadapted network (units off) — on labelled source-like cases if
    given, else on the decoder's confident target voxels — then, with AdaBN units (`adabn`), re-estimate their
    statistics on target patches. The head's weights are this hook's state, so a resumed job scores against the same
    head."""

    def __init__(self, head: EarlySegmentationHead, tap: FeatureTap, targets: TargetPatches, source: Sequence[Case],
                 card: ModelCard, config: LabelFreeConfig, device: torch.device, adabn: bool):
        self.head, self.tap, self.targets, self.source = head, tap, targets, list(source)
        self.card, self.config, self.device, self.adabn = card, config, device, adabn
        self.esh_source = ESH_SOURCE_LABELLED if self.source else ESH_SOURCE_CONFIDENT

    def _batches(self):
        if self.source:
            sampler = PatchSampler(self.source, self.card.patch_size, self.config.patches_per_step, 0.5,
                                   self.config.seed, self.device)
            while True:
                image, label = sampler()
                yield image.to(self.device), label.to(self.device)
        while True:
            yield self.targets().to(self.device), None

    def on_start(self, context: TrainingContext) -> None:
        network, config = context.network, self.config
        set_units_active(network, False)
        try:
            summary = train_head(network, self.head, self.tap, self._batches(), config.esh_steps, config.esh_lr,
                                 config.confidence)
        finally:
            set_units_active(network, True)
        context.emit({"event": "esh", "stage": self.tap.stage, "source": self.esh_source, "steps": config.esh_steps,
                      **summary})
        if self.adabn:
            estimate_adabn(network, (self.targets().to(self.device) for _ in range(config.adabn_batches)))

    def after_step(self, step: int, context: TrainingContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {"head": {k: v.detach().clone() for k, v in self.head.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])


@dataclass
class LabelFreeParts:
    """What the `Trainer` runs for label-free adaptation, and what the event log reports about it."""

    objective: SelfTrainingObjective
    scorer: AgreementScorer
    start: LabelFreeStart
    info: dict


def build_label_free(network: nn.Module, card: ModelCard, targets: Sequence[Case], config: LabelFreeConfig,
                     source: Sequence[Case] = (), reference: Sequence[Case] = ()) -> LabelFreeParts:
    """Attach the adapters to the stages the ESH reads and build the objective, the scorer and the start hook."""
    device = torch.device(config.device)
    network.to(device).eval()
    try:
        stage = choose_stage(network, config.stage, config.stage_index)
    except PEFTAdaptError as exc:  # a model the method cannot adapt: said as the other methods say it
        raise MethodError(f"method 'label-free' cannot adapt model '{card.id}': {exc}; choose a method that "
                          "trains on annotated volumes") from None
    adapted_stages = stages_up_to(network, stage)
    attach_adapters(network, adapted_stages, config)
    tap = FeatureTap(network, stage)
    sampler = TargetPatches(targets, card.patch_size, config.patches_per_step, config.seed)
    held_patches = TargetPatches(targets, card.patch_size, 1, config.seed + HELD_SEED_OFFSET)  # not a training draw
    held = [held_patches().to(device) for _ in range(config.held_patches)]
    head = build_head(network, tap, held[0], card.num_classes)
    adabn = any(isinstance(r.unit, AdaBNUnit) for r in iter_units(network))
    start = LabelFreeStart(head, tap, sampler, source, card, config, device, adabn)
    info = {"esh_stage": stage, "adapted_stages": adapted_stages, "esh_source": start.esh_source,
            "factorisation": config.factorisation, "adabn": adabn}
    return LabelFreeParts(SelfTrainingObjective(head, tap, sampler),
                          AgreementScorer(head, tap, held, card, reference, str(device)), start, info)
