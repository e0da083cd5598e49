"""The one adaptation loop: an objective trains the active adapter units, a scorer audits the network every few
steps, and the best audited state is kept. Supervised adaptation (patches of annotated volumes, Dice + CE, audit
Dice on held-out volumes) and label-free self-training (docs/labelfree.md) are two objective/scorer pairs of the
same `Trainer`; SEA-PEFT's allocator is a hook. One loop means one checkpoint format and one best-state mechanism."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices
from torch import nn

from .adapters import freeze_base, iter_units, parameter_groups, train_units
from .data.augment import Augmentation, AugmentationConfig
from .data.cases import Case
from .data.sparse import UNANNOTATED, annotated, foreground, is_sparse
from .data.transforms import acquired_slices, pad_to_size
from .errors import PEFTAdaptError
from .inference import predict_probabilities
from .models.card import ModelCard
from .selection import AuditCounts, SelectionRule, Verdict, class_distance
from .uncertainty import base_model

Event = dict
EventCallback = Callable[[Event], None]
#: the share of a GPU's free memory the training cases may take there (the rest is the network's and its batch's)
CASES_SHARE_OF_GPU = 0.25


@dataclass
class TrainConfig:
    steps: int
    lr: float
    patches_per_step: int
    audit_every: int
    seed: int
    device: str = "cpu"
    weight_decay: float = 0.0
    pos_fraction: float = 0.5  # share of patches centred on foreground
    #: False where the start cannot be kept (a model whose new head starts untrained): there is nothing to compare a
    #: trained state with, so the best audited trained state is kept whatever the start scored
    start_is_candidate: bool = True


def _random_state_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _random_state_from_json(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


class PatchSampler:
    """Random patches, half centred on foreground, via MONAI's RandCropByPosNegLabeld (seeded). A case smaller than
    the patch is padded (image with its minimum, the normalised background; label with background). Patches are
    centred on annotated voxels only, so a sparsely annotated case gives patches its loss can use.

    The cases are held as tensors, once (MONAI crops a NumPy array by first copying all of it into a tensor, at
    every draw), on the GPU that trains when they fit beside the network (`case_device`): the patches are then cut
    there instead of being copied over at every step. Patches come on `self.device`, where the cases are held."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, pos_fraction: float, seed: int,
                 device: torch.device | str = "cpu"):
        padded = [(pad_to_size(c.array, patch_size, float(c.array.min())), pad_to_size(c.label, patch_size, 0))
                  for c in cases]
        self.device = case_device(sum(array.nbytes + label.nbytes for array, label in padded), torch.device(device))
        self.cases = [(torch.as_tensor(array, device=self.device), torch.as_tensor(label, device=self.device))
                      for array, label in padded]
        self.rng = np.random.default_rng(seed)
        self.crop = RandCropByPosNegLabeld(
            keys=("image", "label"), label_key="label", spatial_size=list(patch_size),
            pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=count, allow_smaller=True,
            fg_indices_key="fg", bg_indices_key="bg",
        )
        self.crop.set_random_state(seed=seed)
        # foreground/background voxel indices once per case, not at every draw (it dominated a GPU step)
        self.indices = [map_binary_to_indices(foreground(label), annotated(label)) for _, label in padded]

    def state_dict(self) -> dict:
        return {"chooser": self.rng.bit_generator.state,
                "crop": _random_state_to_json(self.crop.cropper.R.get_state())}  # the inner cropper draws

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["chooser"]
        self.crop.cropper.R.set_state(_random_state_from_json(state["crop"]))

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.rng.integers(len(self.cases)))
        (array, label), (fg, bg) = self.cases[index], self.indices[index]
        samples = self.crop({"image": array, "label": label, "fg": fg, "bg": bg})
        image = torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples])
        label = torch.stack([torch.as_tensor(s["label"]).as_subclass(torch.Tensor) for s in samples])
        return image.float(), label.long()


def case_device(nbytes: int, device: torch.device) -> torch.device:
    """Where the sampler holds `nbytes` of cases for training on `device`: on the GPU when they take at most
    `CASES_SHARE_OF_GPU` of its free memory, else in host memory, as on other devices (many large volumes must not
    starve the network of GPU memory; MONAI's augmentations are checked on CUDA and the CPU only)."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= CASES_SHARE_OF_GPU * free else torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere (CPU bf16 convolutions are slower than fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Objective(Protocol):
    """What one training step minimises; draws its own batch (its RNG state is part of the checkpoint)."""

    def loss(self, network: nn.Module, device: torch.device) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MaskedDiceCE:
    """Dice + cross-entropy over the annotated voxels only (label `UNANNOTATED` elsewhere): unannotated voxels enter
    neither term, so they get no gradient. On a fully annotated patch it equals MONAI's
    `DiceCELoss(to_onehot_y=True, softmax=True)`."""

    def __init__(self):
        self.dice = DiceLoss()

    def __call__(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        mask = label != UNANNOTATED
        target = torch.where(mask, label, 0).long()
        weight = mask.float()
        cross_entropy = nn.functional.cross_entropy(logits, target[:, 0], reduction="none")
        cross_entropy = (cross_entropy * weight[:, 0]).sum() / weight.sum().clamp(min=1)
        probabilities = torch.softmax(logits, dim=1) * weight
        onehot = torch.zeros_like(probabilities).scatter_(1, target, 1.0) * weight
        return self.dice(probabilities, onehot) + cross_entropy


class SupervisedObjective:
    """Dice + cross-entropy on random, augmented patches of the annotated voxels of the support volumes."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, pos_fraction: float, seed: int,
                 augmentation: AugmentationConfig | None = None, device: torch.device | str = "cpu"):
        self.sampler = PatchSampler(cases, patch_size, count, pos_fraction, seed, device)
        self.augment = Augmentation(augmentation or AugmentationConfig(), seed, self.sampler.device)
        self.loss_fn = MaskedDiceCE()

    def loss(self, network: nn.Module, device: torch.device) -> torch.Tensor:
        image, label = self.augment(*self.sampler())
        with autocast(device):
            logits = network(image.to(device))
        return self.loss_fn(logits.float(), label.to(device))

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "augment": self.augment.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.augment.load_state_dict(state["augment"])


@dataclass
class Score:
    """One audit: the value the best state is chosen by, the event's fields, and what a verdict compares."""

    value: float
    fields: dict
    counts: AuditCounts | None = None


class Scorer(Protocol):
    """Audits the network; `event` names the event it emits, `key` the field of its value. `judge` says whether a
    score may replace the baseline (None: the higher value wins)."""

    event: str
    key: str

    def __call__(self, network: nn.Module) -> Score: ...

    def judge(self, score: Score, baseline: Score) -> Verdict | None: ...


def audit_counts(network: nn.Module, cases: Sequence[Case], card: ModelCard, device: str) -> AuditCounts:
    """Per-slab overlap and volume counts of every audit case's prediction (whole volumes, model grid; of a sparse
    case, its annotated voxels only)."""
    return AuditCounts([case_counts(predict_probabilities(network, case.array, card, device).argmax(0), case, card)
                        for case in cases])


def case_counts(prediction: np.ndarray, case: Case, card: ModelCard) -> np.ndarray:
    """One audit case's per-slab counts of `prediction` (selection.AuditCounts.measure). The slabs are of whole
    acquired slices; slices a user corrected, too few for a verdict, are cut into bands of rows instead, so that a
    correction of a few slices can be judged. A volume's slices are not: an audit volume thinner than a verdict
    needs shows no gain (docs/selection.md)."""
    return AuditCounts.measure(prediction, case.label[0], card.num_classes,
                               annotated=annotated(case.label[0]) if is_sparse(case.label) else None,
                               layers=acquired_slices(case.image, case.model_image),
                               bands_below=SelectionRule().fewest_units() if case.corrected else 1)


def audit_dice(network: nn.Module, cases: Sequence[Case], card: ModelCard, device: str) -> float:
    """Mean Dice over the audit volumes of the classes present in each one's reference (model grid)."""
    return audit_counts(network, cases, card, device).dice()


def audit_change(network: nn.Module, cases: Sequence[Case], card: ModelCard, device: str) -> dict[int, float]:
    """Per class index: the largest change the adapter units make on any audit case against the source model
    (Jaccard distance of the class masks, model grid; of a sparse case, its annotated voxels only). The audit's
    verdict covers changes of this size; a larger one elsewhere is unverified."""
    largest: dict[int, float] = {}
    for case in cases:
        adapted = predict_probabilities(network, case.array, card, device).argmax(0)
        with base_model(network):
            base = predict_probabilities(network, case.array, card, device).argmax(0)
        where = annotated(case.label[0]) if is_sparse(case.label) else None
        for index, distance in class_distance(adapted, base, card.num_classes, where).items():
            largest[index] = max(distance, largest.get(index, 0.0))
    return largest


class AuditScorer:
    """Dice on whole held-out annotated volumes (model grid); a state replaces the baseline only when the rule
    finds its gain reliable (`selection.py`)."""

    event, key = "audit", "dice"

    def __init__(self, cases: Sequence[Case], card: ModelCard, device: str, rule: SelectionRule | None = None):
        self.cases, self.card, self.device = list(cases), card, device
        self.rule = rule or SelectionRule()

    def __call__(self, network: nn.Module) -> Score:
        counts = audit_counts(network, self.cases, self.card, self.device)
        classes = {label.name: value for label, value in zip(self.card.labels[1:], counts.class_dice())}
        return Score(counts.dice(), {"dice": counts.dice(), "cases": counts.case_dice(), "classes": classes}, counts)

    def judge(self, score: Score, baseline: Score) -> Verdict:
        return self.rule.judge(score.counts, baseline.counts)

    def too_few_units(self) -> str:
        """Why no gain can pass the rule on these audit cases (too few slabs in all), or "" when one can."""
        units = {case.name: len(case_counts(case.label[0], case, self.card)) for case in self.cases}
        need = self.rule.fewest_units()
        if sum(units.values()) >= need:
            return ""
        listed = ", ".join(f"{name}: {n}" for name, n in units.items())
        return (f"the audit gives {sum(units.values())} independent slab(s) ({listed}; a slab never splits one "
                f"acquired slice), and no gain can be shown at {100 * self.rule.confidence:.0f} % confidence on "
                f"fewer than {need}: give more annotated slices to audit on (a thicker audit volume, or more of them)")


def _never() -> bool:
    return False


@dataclass
class TrainingContext:
    """What a hook sees: the network being adapted, its card, the audit cases, the event sink, the trainer's
    `judge` (the network's audit score now, and the selection rule's verdict against the start) and `compare` (that
    rule's verdict between any two audit scores), and the run's `should_stop` (a cancel: a hook doing long work
    then raises `StopRequested`)."""

    network: nn.Module
    card: ModelCard
    audit: Sequence[Case]
    device: str
    emit: EventCallback
    judge: Callable[[], tuple["Score", Verdict | None]] | None = None
    compare: Callable[["Score", "Score"], Verdict | None] | None = None
    should_stop: Callable[[], bool] = _never


class TrainingHook(Protocol):
    """Acts on the network while it trains (e.g. the SEA-PEFT allocator toggling units).

    All units sit in the optimizer from the start; inactive ones get no gradient, so AdamW leaves them (and their
    moments) untouched until they are switched on.
    """

    def after_step(self, step: int, context: TrainingContext) -> None: ...

    # optional: `on_start(context)`, called once before the step-0 audit; `on_restore(step, best_step, context)`,
    # called once the best state is restored (its gates may differ from the last ones the hook set)

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def phase_event(phase: str, step: int, detail: str = "") -> dict:
    """A `phase` event (docs/worker.md): what a long stretch without steps is doing, and within it, `detail`."""
    return {"event": "phase", "phase": phase, "step": step, **({"detail": detail} if detail else {})}


class StopRequested(Exception):
    """Raised by a hook that saw a cancel in the middle of long work (SEA-PEFT's final sweep): the trainer puts the
    hooks back as they were before the step, and a resume does that work again."""


class TrainingDiverged(PEFTAdaptError):
    """The loss or a trained parameter is no longer finite: the run stops before that state is audited or saved."""


class Trainer:
    """The adaptation loop as an object whose whole state can be checkpointed and restored.

    State: step, score history, losses, best audited unit tensors, optimizer moments, every RNG the loop draws from
    (torch, the objective's sampler) and each hook's state — so a resumed run continues the same sequence.
    """

    def __init__(self, objective: Objective, scorer: Scorer, context: TrainingContext, config: TrainConfig,
                 hooks: Sequence[TrainingHook] = ()):
        self.objective, self.scorer, self.context, self.config = objective, scorer, context, config
        self.network, self.emit = context.network, context.emit
        self.hooks = list(hooks)
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        self.network.to(self.device)
        freeze_base(self.network)
        groups = parameter_groups(self.network, config.lr)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay) if groups else None
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.losses: list[float] = []
        self.best_score, self.best_step, self.best_state = -1.0, 0, self._unit_state()
        self.baseline: Score | None = None  # the state the run started from (step 0)
        self.best_full: Score | None = None  # the best state's whole score, as audited in this session
        self.best_verdict: dict = {}
        self.flagged = False
        self.prepared = False
        self.seconds = 0.0
        context.judge, context.compare = self.judge, scorer.judge

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
        baseline = self.baseline
        return {
            "step": self.step, "history": self.history, "losses": self.losses, "best_score": self.best_score,
            "best_step": self.best_step, "best_state": self.best_state, "seconds": self.seconds,
            "baseline": None if baseline is None else {
                "value": baseline.value, "fields": baseline.fields,
                "counts": baseline.counts.to_state() if baseline.counts is not None else None},
            "best_verdict": self.best_verdict, "flagged": self.flagged,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None, "torch_rng": torch.get_rng_state(),
            "objective": self.objective.state_dict(), "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.losses = state["step"], [tuple(h) for h in state["history"]], state["losses"]
        self.best_score, self.best_step, self.best_state = state["best_score"], state["best_step"], state["best_state"]
        self.best_full = None
        self.seconds = state["seconds"]
        saved = state["baseline"]
        self.baseline = None if saved is None else Score(
            saved["value"], saved["fields"], AuditCounts.from_state(saved["counts"]) if saved["counts"] else None)
        self.best_verdict, self.flagged = state["best_verdict"], state["flagged"]
        self.prepared = True
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.objective.load_state_dict(state["objective"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)

    # -- loop ----------------------------------------------------------------------------------------------------
    def judge(self) -> tuple[Score, Verdict | None]:
        """The network's audit score now, and whether the rule would let it replace the start."""
        score = self.scorer(self.network)
        return score, self._verdict(score)

    def _verdict(self, score: Score) -> Verdict | None:
        """The rule's verdict on `score` against the start; None where there is nothing to compare with (no start
        audited yet, or a start that is no candidate: an untrained new head)."""
        if self.baseline is None or not self.config.start_is_candidate:
            return None
        return self.scorer.judge(score, self.baseline)

    def _beats_best(self, score: Score) -> bool:
        """Whether `score` beats the best state so far; a start that is no candidate is beaten by any trained state."""
        return score.value > self.best_score or (self.best_step == 0 and not self.config.start_is_candidate)

    def audit(self) -> float:
        """Score the network; the first score is the baseline, a later one becomes the best state only if the
        scorer's rule accepts it against the baseline (and it beats the best so far)."""
        score = self.scorer(self.network)
        fields = dict(score.fields)
        self.history.append((self.step, score.value))
        if self.baseline is None:
            self.baseline = score
            self.best_score, self.best_step, self.best_state = score.value, self.step, self._unit_state()
            self.best_full = score
        else:
            verdict = self._verdict(score)
            accepted = verdict is None or verdict.reliable
            if verdict is not None:
                fields.update(verdict.fields())
                if verdict.flag and not self.flagged:
                    self.flagged = True
                    self.emit({"event": "warning", "step": self.step, "message": verdict.flag})
            if accepted and self._beats_best(score):
                self.best_score, self.best_step, self.best_state = score.value, self.step, self._unit_state()
                self.best_full = score
                self.best_verdict = verdict.fields() if verdict is not None else {}
        self.emit({"event": self.scorer.event, "step": self.step, **fields})
        return score.value

    def _train_step(self) -> float:
        train_units(self.network)
        loss = self.objective.loss(self.network, self.device)
        if not torch.isfinite(loss):  # checked before the update: the parameters are still the last finite ones
            raise self._diverged(f"the loss is {float(loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        trained = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        finite = torch.stack([torch.isfinite(p).all() for _, p in trained]).tolist()  # one wait for a GPU, not one each
        if not all(finite):
            raise self._diverged(f"parameter {trained[finite.index(False)][0]} is no longer finite")
        return float(loss.detach())

    def prepare(self) -> None:
        """The hooks' start (e.g. SEA-PEFT's first allocation), once per run, before the step-0 audit."""
        if not self.prepared:
            self.prepared = True
            for hook in self.hooks:
                if hasattr(hook, "on_start"):
                    hook.on_start(self.context)

    def _diverged(self, what: str) -> "TrainingDiverged":
        return TrainingDiverged(f"training stopped at step {self.step}: {what}; the learning rate ({self.config.lr:g}) "
                                "is probably too high — start again with a lower one (the last checkpoint, written "
                                "before this step, is kept)")

    def run(
        self,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[["Trainer"], None] | None = None,
        checkpoint_every: int = 0,
    ) -> bool:
        """Train up to `config.steps`; returns False when stopped early (the state is then consistent to resume).
        With nothing trainable (e.g. statistics-only units) only the step-0 audit runs."""
        config = self.config
        self.context.should_stop = should_stop or _never
        self.prepare()
        if not self.history:
            self.emit(phase_event("auditing", self.step))
            self.audit()
        if self.optimizer is None:
            return True
        session_start, seconds_before, first = time.monotonic(), self.seconds, self.step
        if self.step >= config.steps:  # resumed after its last step: what is left is the choosing
            self._choosing()
            if self.history[-1][0] < self.step:  # cancelled before the last step's hooks and audit were done
                return self._conclude()
        while self.step < config.steps:
            if self.context.should_stop():
                return False
            self.step += 1
            self.losses.append(self._train_step())
            elapsed = time.monotonic() - session_start
            self.seconds = seconds_before + elapsed
            self.emit({"event": "step", "step": self.step, "steps": config.steps, "loss": self.losses[-1],
                       "eta_s": elapsed / (self.step - first) * (config.steps - self.step)})
            if self.step == config.steps:
                self._choosing()
                if not self._conclude():
                    return False
            else:
                for hook in self.hooks:
                    hook.after_step(self.step, self.context)
                if self.step % config.audit_every == 0:
                    self.audit()
            if on_checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                on_checkpoint(self)
        return True

    def _conclude(self) -> bool:
        """The last step's hooks (SEA-PEFT's final sweep: minutes on whole-brain audits) and audit. A cancel in
        between puts the hooks back as they were before them and returns False: the checkpoint then holds the last
        step's state without them, and a resume does them again, as the uninterrupted run did."""
        before = [copy.deepcopy(hook.state_dict()) for hook in self.hooks]
        try:
            for hook in self.hooks:
                hook.after_step(self.step, self.context)
            if self.context.should_stop():
                raise StopRequested
            self._choosing("auditing the last step's state")
            self.audit()
        except StopRequested:
            for hook, state in zip(self.hooks, before):
                hook.load_state_dict(state)
            return False
        return True

    def _choosing(self, detail: str = "") -> None:
        """Said after the last step: the final sweep, the last audits and the verdict take a while yet."""
        self.emit(phase_event("choosing", self.step, detail))

    def restore_best(self) -> None:
        """Leave the network at the best audited state; hooks that report the units they switched on say which ones
        that state has (the kept adapter's, not the last they set)."""
        self._load_unit_state(self.best_state)
        self.network.eval()
        for hook in self.hooks:
            if hasattr(hook, "on_restore"):
                hook.on_restore(self.step, self.best_step, self.context)

    def kept_score(self) -> Score:
        """The score of the state `restore_best` left, as audited when it became the best (the start's travels in
        the checkpoint); scored again only after a resume, which does not hold the others."""
        if self.best_step == 0 and self.baseline is not None:
            return self.baseline
        if self.best_full is not None:
            return self.best_full
        self._choosing(f"scoring the kept state (step {self.best_step})")
        return self.scorer(self.network)

    def summary(self) -> dict:
        """The run's outcome; `kept_start` says the starting state was kept (no state passed the rule)."""
        return {"history": self.history, "losses": self.losses, "best_score": self.best_score,
                "best_step": self.best_step, "seconds": self.seconds, "kept_start": self.best_step == 0,
                "verdict": self.best_verdict}


def supervised_trainer(network: nn.Module, card: ModelCard, support: Sequence[Case], audit: Sequence[Case],
                       config: TrainConfig, on_event: EventCallback | None = None,
                       hooks: Sequence[TrainingHook] = ()) -> Trainer:
    """A trainer on annotated support volumes, audited by Dice on annotated audit volumes."""
    objective = SupervisedObjective(support, card.patch_size, config.patches_per_step, config.pos_fraction,
                                    config.seed, AugmentationConfig.from_card(card.extra), config.device)
    context = TrainingContext(network, card, audit, config.device, on_event or (lambda event: None))
    return Trainer(objective, AuditScorer(audit, card, config.device), context, config, hooks)


def adapt(network: nn.Module, card: ModelCard, support: Sequence[Case], audit: Sequence[Case], config: TrainConfig,
          on_event: EventCallback | None = None, should_stop: Callable[[], bool] | None = None,
          hooks: Sequence[TrainingHook] = ()) -> dict:
    """Train the adapter units of `network` in place (API use); leave it at the best audited state."""
    trainer = supervised_trainer(network, card, support, audit, config, on_event, hooks)
    trainer.run(should_stop)
    trainer.restore_best()
    return trainer.summary()
