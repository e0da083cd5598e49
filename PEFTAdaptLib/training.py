"""Few-shot adaptation loop: random patches from the support cases, Dice + CE, AdamW on the adapter units only,
with a periodic Dice audit on a held-out case and selection of the best audited adapter state."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import RandCropByPosNegLabeld
from torch import nn

from .adapters import freeze_base, iter_units, trainable_parameters
from .data.cases import Case
from .inference import predict_probabilities
from .metrics import dice
from .models.card import ModelCard

Event = dict
EventCallback = Callable[[Event], None]


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    patches_per_step: int = 2
    pos_fraction: float = 0.5  # share of patches centred on foreground
    audit_every: int = 25
    seed: int = 0
    device: str = "cpu"


class PatchSampler:
    """Random patches, half centred on foreground, via MONAI's RandCropByPosNegLabeld (seeded)."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, pos_fraction: float, seed: int):
        self.cases = list(cases)
        self.rng = np.random.default_rng(seed)
        self.crop = RandCropByPosNegLabeld(
            keys=("image", "label"), label_key="label", spatial_size=list(patch_size),
            pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=count, allow_smaller=True,
        )
        self.crop.set_random_state(seed=seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[self.rng.integers(len(self.cases))]
        samples = self.crop({"image": case.array, "label": case.label})
        image = torch.stack([torch.as_tensor(np.asarray(s["image"])) for s in samples])
        label = torch.stack([torch.as_tensor(np.asarray(s["label"])) for s in samples])
        return image.float(), label.long()


@dataclass
class TrainingContext:
    """What a hook sees: the network being adapted, its card, the audit cases and the event sink."""

    network: nn.Module
    card: ModelCard
    audit: Sequence[Case]
    device: str
    emit: EventCallback

    def audit_dice(self) -> float:
        return audit_dice(self.network, self.audit, self.card, self.device)


class TrainingHook(Protocol):
    """Changes the adapter topology while training (e.g. the SEA-PEFT allocator toggling units).

    All units of the pool sit in the optimizer from the start; inactive ones get no gradient, so AdamW leaves them
    (and their moments) untouched until they are switched on.
    """

    def after_step(self, step: int, context: TrainingContext) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def audit_dice(network: nn.Module, cases: Sequence[Case], card: ModelCard, device: str) -> float:
    """Mean foreground Dice (all non-background classes together) over whole audit volumes on the model grid."""
    scores = []
    for case in cases:
        probs = predict_probabilities(network, case.array, card, device)
        prediction = probs.argmax(0)
        scores.append(np.mean([dice(prediction == c, case.label[0] == c) for c in range(1, card.num_classes)]))
    return float(np.mean(scores))


def adapt(
    network: nn.Module,
    card: ModelCard,
    support: Sequence[Case],
    audit: Sequence[Case],
    config: TrainConfig,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    hooks: Sequence[TrainingHook] = (),
) -> dict:
    """Train the active adapter units of `network` in place; leave it at the best audited state.

    Emits events: `audit` (step, dice), `step` (step, loss, eta_s). Returns a summary with the Dice history.
    """
    emit = on_event or (lambda event: None)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    network.to(device)
    freeze_base(network)
    params = trainable_parameters(network, active_only=False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    sampler = PatchSampler(support, card.patch_size, config.patches_per_step, config.pos_fraction, config.seed)

    def unit_state() -> dict:
        return {f"{r.layer}::{r.name}": copy.deepcopy(r.unit.state_dict()) for r in iter_units(network)}

    history = [(0, audit_dice(network, audit, card, config.device))]
    emit({"event": "audit", "step": 0, "dice": history[0][1]})
    best_dice, best_step, best_state = history[0][1], 0, unit_state()
    context = TrainingContext(network, card, audit, config.device, emit)
    start, losses = time.monotonic(), []
    for step in range(1, config.steps + 1):
        if should_stop is not None and should_stop():
            break
        network.train()
        image, label = sampler()
        loss = loss_fn(network(image.to(device)), label.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        elapsed = time.monotonic() - start
        emit({"event": "step", "step": step, "steps": config.steps, "loss": losses[-1],
              "eta_s": elapsed / step * (config.steps - step)})
        for hook in hooks:
            hook.after_step(step, context)
        if step % config.audit_every == 0 or step == config.steps:
            score = audit_dice(network, audit, card, config.device)
            history.append((step, score))
            emit({"event": "audit", "step": step, "dice": score})
            if score > best_dice:
                best_dice, best_step, best_state = score, step, unit_state()
    units = {f"{r.layer}::{r.name}": r.unit for r in iter_units(network)}
    for key, state in best_state.items():
        units[key].load_state_dict(state)
    network.eval()
    return {"history": history, "losses": losses, "best_dice": best_dice, "best_step": best_step,
            "seconds": time.monotonic() - start}
