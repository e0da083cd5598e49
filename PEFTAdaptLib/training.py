"""Few-shot adaptation loop: random patches from the support cases, Dice + CE, AdamW on the adapter units only,
with a periodic Dice audit on a held-out case and selection of the best audited adapter state."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices
from torch import nn

from .adapters import freeze_base, iter_units, parameter_groups
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


def _random_state_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _random_state_from_json(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


class PatchSampler:
    """Random patches, half centred on foreground, via MONAI's RandCropByPosNegLabeld (seeded)."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, pos_fraction: float, seed: int):
        self.cases = list(cases)
        self.rng = np.random.default_rng(seed)
        self.crop = RandCropByPosNegLabeld(
            keys=("image", "label"), label_key="label", spatial_size=list(patch_size),
            pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=count, allow_smaller=True,
            fg_indices_key="fg", bg_indices_key="bg",
        )
        self.crop.set_random_state(seed=seed)
        # foreground/background voxel indices once per case, not at every draw (it dominated a GPU step)
        self.indices = [map_binary_to_indices(case.label > 0) for case in self.cases]

    def state_dict(self) -> dict:
        return {"chooser": self.rng.bit_generator.state,
                "crop": _random_state_to_json(self.crop.cropper.R.get_state())}  # the inner cropper draws

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["chooser"]
        self.crop.cropper.R.set_state(_random_state_from_json(state["crop"]))

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.rng.integers(len(self.cases)))
        case, (fg, bg) = self.cases[index], self.indices[index]
        samples = self.crop({"image": case.array, "label": case.label, "fg": fg, "bg": bg})
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

    # optional: `on_start(context)`, called once before the step-0 audit

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


class Trainer:
    """The adaptation loop as an object whose whole state can be checkpointed and restored.

    State: step, Dice history, losses, best audited unit tensors, optimizer moments, every RNG the loop draws from
    (torch, the case chooser, MONAI's crop) and each hook's state — so a resumed run continues the same sequence.
    """

    def __init__(
        self,
        network: nn.Module,
        card: ModelCard,
        support: Sequence[Case],
        audit: Sequence[Case],
        config: TrainConfig,
        on_event: EventCallback | None = None,
        hooks: Sequence[TrainingHook] = (),
    ):
        self.network, self.card, self.audit, self.config = network, card, audit, config
        self.emit = on_event or (lambda event: None)
        self.hooks = list(hooks)
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        network.to(self.device)
        freeze_base(network)
        self.optimizer = torch.optim.AdamW(parameter_groups(network, config.lr), weight_decay=config.weight_decay)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.sampler = PatchSampler(support, card.patch_size, config.patches_per_step, config.pos_fraction, config.seed)
        self.context = TrainingContext(network, card, audit, config.device, self.emit)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.losses: list[float] = []
        self.best_dice, self.best_step, self.best_state = -1.0, 0, self._unit_state()
        self.seconds = 0.0

    # -- state ---------------------------------------------------------------------------------------------------
    def _unit_state(self) -> dict[str, dict]:
        """Every unit's tensors and gate: an allocator changes both, and the best state needs both."""
        return {f"{r.layer}::{r.name}": {"tensors": {k: v.detach().clone() for k, v in r.unit.state_dict().items()},
                                         "active": r.active}
                for r in iter_units(self.network)}

    def _load_unit_state(self, state: dict[str, dict]) -> None:
        records = {f"{r.layer}::{r.name}": r for r in iter_units(self.network)}
        for key, saved in state.items():
            records[key].unit.load_state_dict(saved["tensors"])
            records[key].owner.set_active(records[key].name, saved["active"])

    def state_dict(self) -> dict:
        """Everything but the current unit tensors (saved as the adapter itself)."""
        return {
            "step": self.step, "history": self.history, "losses": self.losses, "best_dice": self.best_dice,
            "best_step": self.best_step, "best_state": self.best_state, "seconds": self.seconds,
            "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "sampler": self.sampler.state_dict(), "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.losses = state["step"], [tuple(h) for h in state["history"]], state["losses"]
        self.best_dice, self.best_step, self.best_state = state["best_dice"], state["best_step"], state["best_state"]
        self.seconds = state["seconds"]
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.load_state_dict(state["sampler"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)

    # -- loop ----------------------------------------------------------------------------------------------------
    def _audit(self) -> float:
        score = self.context.audit_dice()
        self.history.append((self.step, score))
        self.emit({"event": "audit", "step": self.step, "dice": score})
        if score > self.best_dice:
            self.best_dice, self.best_step, self.best_state = score, self.step, self._unit_state()
        return score

    def _train_step(self) -> float:
        self.network.train()
        image, label = self.sampler()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.network(image.to(self.device))
        loss = self.loss_fn(logits.float(), label.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(
        self,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[["Trainer"], None] | None = None,
        checkpoint_every: int = 0,
    ) -> bool:
        """Train up to `config.steps`; returns False when stopped early (the state is then consistent to resume)."""
        config = self.config
        if not self.history:
            for hook in self.hooks:
                if hasattr(hook, "on_start"):
                    hook.on_start(self.context)
            self._audit()
        session_start, seconds_before, first = time.monotonic(), self.seconds, self.step
        while self.step < config.steps:
            if should_stop is not None and should_stop():
                return False
            self.step += 1
            self.losses.append(self._train_step())
            elapsed = time.monotonic() - session_start
            self.seconds = seconds_before + elapsed
            self.emit({"event": "step", "step": self.step, "steps": config.steps, "loss": self.losses[-1],
                       "eta_s": elapsed / (self.step - first) * (config.steps - self.step)})
            for hook in self.hooks:
                hook.after_step(self.step, self.context)
            if self.step % config.audit_every == 0 or self.step == config.steps:
                self._audit()
            if on_checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                on_checkpoint(self)
        return True

    def finish(self) -> dict:
        """Leave the network at the best audited state and summarise."""
        self._load_unit_state(self.best_state)
        self.network.eval()
        return {"history": self.history, "losses": self.losses, "best_dice": self.best_dice,
                "best_step": self.best_step, "seconds": self.seconds}


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
    trainer = Trainer(network, card, support, audit, config, on_event, hooks)
    trainer.run(should_stop)
    return trainer.finish()
