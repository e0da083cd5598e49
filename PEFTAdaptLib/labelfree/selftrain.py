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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import (
    AdaBNConfig, AdaBNUnit, ConvLoRAConfig, NormAffineConfig, NormAffineUnit, UnitRecord, add_units, apply_adapter,
    count_trainable, estimate_adabn, freeze_base, iter_units, trainable_parameters,
)
from ..adapters.base import BATCH_NORM_TYPES, NORM_TYPES, base_layer_names
from ..data.cases import Case
from ..metrics import dice
from ..models.card import ModelCard
from ..training import PatchSampler, audit_dice
from .esh import (
    ESH_SOURCE_CONFIDENT, ESH_SOURCE_LABELLED, EarlySegmentationHead, FeatureTap, build_head, choose_stage,
    stages_up_to, train_head,
)
from .loss import masked_dice_ce
from .patches import TargetPatches

EventCallback = Callable[[dict], None]
#: the held agreement patches come from their own random stream (seed + 1), not from this run's training draws
HELD_SEED_OFFSET = 1


@dataclass
class LabelFreeConfig:
    steps: int = 100
    lr: float = 1e-3
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
    eval_every: int = 10
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


def unit_state(network: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every unit's tensors (ConvLoRA and norm-affine parameters, AdaBN statistics): what selection keeps."""
    return {f"{r.layer}::{r.name}": {k: v.detach().clone() for k, v in r.unit.state_dict().items()}
            for r in iter_units(network)}


def load_unit_state(network: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    records = {f"{r.layer}::{r.name}": r for r in iter_units(network)}
    for key, tensors in state.items():
        records[key].unit.load_state_dict(tensors)


class LabelFreeAdaptation:
    """ESH training, self-training and agreement-based selection for one network (adapted in place).

    Events: `esh` (stage, source, loss, supervised_fraction), `step` (step, steps, loss, eta_s), `agreement`
    (step, agreement; `dice` too when reference cases are given — evaluation only, never used for selection)."""

    def __init__(self, network: nn.Module, card: ModelCard, targets: Sequence[Case], config: LabelFreeConfig,
                 source: Sequence[Case] = (), reference: Sequence[Case] = (), on_event: EventCallback | None = None):
        self.network, self.card, self.config = network, card, config
        self.source, self.reference = list(source), list(reference)
        self.emit = on_event or (lambda event: None)
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        network.to(self.device).eval()
        self.stage = choose_stage(network, config.stage, config.stage_index)
        self.adapted_stages = stages_up_to(network, self.stage)
        attach_adapters(network, self.adapted_stages, config)
        freeze_base(network)
        self.tap = FeatureTap(network, self.stage)
        self.sampler = TargetPatches(targets, card.patch_size, config.patches_per_step, config.seed)
        held = TargetPatches(targets, card.patch_size, 1, config.seed + HELD_SEED_OFFSET)  # not a training draw
        self.held = [held().to(self.device) for _ in range(config.held_patches)]
        self.head = build_head(network, self.tap, self.held[0], card.num_classes)
        self.esh_source = ESH_SOURCE_LABELLED if self.source else ESH_SOURCE_CONFIDENT
        self.optimizer = None
        self.step, self.losses, self.seconds = 0, [], 0.0
        self.history: list[tuple[int, float]] = []
        self.reference_history: list[tuple[int, float]] = []
        self.best_agreement, self.best_step, self.best_state = -1.0, 0, unit_state(network)

    @property
    def trainable(self) -> int:
        return count_trainable(self.network)

    def _set_units_active(self, active: bool) -> None:
        for record in iter_units(self.network):
            record.owner.set_active(record.name, active)

    def _batches(self):
        if self.source:
            sampler = PatchSampler(self.source, self.card.patch_size, self.config.patches_per_step, 0.5,
                                   self.config.seed)
            while True:
                image, label = sampler()
                yield image.to(self.device), label.to(self.device)
        while True:
            yield self.sampler().to(self.device), None

    def train_head(self) -> dict:
        """Fit the ESH on the unadapted source network (units switched off): on the labelled source cases if any,
        else on the decoder's confident voxels of the first target batches."""
        self._set_units_active(False)
        try:
            summary = train_head(self.network, self.head, self.tap, self._batches(), self.config.esh_steps,
                                 self.config.esh_lr, self.config.confidence)
        finally:
            self._set_units_active(True)
        summary = {"stage": self.stage, "source": self.esh_source, "steps": self.config.esh_steps, **summary}
        self.emit({"event": "esh", **summary})
        return summary

    @torch.no_grad()
    def agreement(self) -> float:
        """Foreground Dice between the ESH's and the decoder's argmax over all held target patches together."""
        self.network.eval()
        esh, decoder = [], []
        for image in self.held:
            logits = self.network(image)
            decoder.append(logits.argmax(1).cpu().numpy())
            esh.append(self.head(self.tap.features, image.shape[2:]).argmax(1).cpu().numpy())
        esh_all, decoder_all = np.concatenate(esh), np.concatenate(decoder)
        return float(np.mean([dice(esh_all == c, decoder_all == c) for c in range(1, self.card.num_classes)]))

    def reference_dice(self) -> float:
        """Mean foreground Dice against the reference labels (whole volumes): for reporting only."""
        return audit_dice(self.network, self.reference, self.card, str(self.device))

    def _evaluate(self) -> None:
        score = self.agreement()
        self.history.append((self.step, score))
        event = {"event": "agreement", "step": self.step, "agreement": score}
        if self.reference:  # evaluation only: reported, never used for training or selection
            event["dice"] = self.reference_dice()
            self.reference_history.append((self.step, event["dice"]))
        if score > self.best_agreement:
            self.best_agreement, self.best_step, self.best_state = score, self.step, unit_state(self.network)
        self.emit(event)

    def _train_step(self) -> float:
        image = self.sampler().to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _ = self_training_loss(self.network, self.head, self.tap, image)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """Self-train for `config.steps`; returns False when stopped early."""
        config = self.config
        if any(isinstance(r.unit, AdaBNUnit) for r in iter_units(self.network)):
            estimate_adabn(self.network, (self.sampler().to(self.device) for _ in range(config.adabn_batches)))
        parameters = trainable_parameters(self.network)
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0) if parameters else None
        self._evaluate()
        if self.optimizer is None:  # nothing trainable (e.g. AdaBN on a network without BatchNorm)
            return True
        start = time.monotonic()
        while self.step < config.steps:
            if should_stop is not None and should_stop():
                return False
            self.step += 1
            self.losses.append(self._train_step())
            self.seconds = time.monotonic() - start
            self.emit({"event": "step", "step": self.step, "steps": config.steps, "loss": self.losses[-1],
                       "eta_s": self.seconds / self.step * (config.steps - self.step)})
            if self.step % config.eval_every == 0 or self.step == config.steps:
                self._evaluate()
        return True

    def finish(self) -> dict:
        """Leave the network at the best-agreement adapter state, detach the tap, summarise."""
        load_unit_state(self.network, self.best_state)
        self.tap.remove()
        self.network.eval()
        return {"stage": self.stage, "adapted_stages": self.adapted_stages, "esh_source": self.esh_source,
                "history": self.history, "reference": self.reference_history, "losses": self.losses,
                "best_agreement": self.best_agreement, "best_step": self.best_step, "trainable": self.trainable,
                "seconds": self.seconds}


def adapt_label_free(network: nn.Module, card: ModelCard, targets: Sequence[Case], config: LabelFreeConfig,
                     source: Sequence[Case] = (), reference: Sequence[Case] = (),
                     on_event: EventCallback | None = None) -> dict:
    """Adapt `network` in place to the unlabelled `targets`; return the summary (see `LabelFreeAdaptation`)."""
    adaptation = LabelFreeAdaptation(network, card, targets, config, source, reference, on_event)
    adaptation.train_head()
    adaptation.run()
    return adaptation.finish()
