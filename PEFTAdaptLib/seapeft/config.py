"""SEA-PEFT settings in one place (the reference's schedule, rescaled from 6,000+ steps to the 30–300 steps a
few-shot adaptation runs on a CPU or a single GPU)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class SeaPeftConfig:
    #: trainable-parameter budget (a count: `methods.Budget` turns the user's fraction into one). Binding: never exceeded.
    budget: int
    #: the run's total optimizer steps; the final configuration sweep runs at the last one (None: no sweep — the
    #: trainer's best-audited-state selection is then the only final selection)
    steps: int | None = None
    #: steps the first allocation trains before any re-allocation (its units are guarded that long)
    warmup: int = 16
    audit_every: int = 8  # toggle audits (a sample of trained units) every this many steps
    allocate_every: int = 16  # first-order estimates of untrained units + knapsack + controller
    audit_units: int = 2  # units toggled per audit
    #: size of the fixed audit buffer, in training patches: the whole audit volume(s) when they fit in this many
    #: patches' voxels (every false positive counts), else this many patches drawn once from them
    audit_patches: int = 8
    active_share: float = 0.75  # share of audit slots for active units (the rest: trained, inactive ones)
    debt_horizon: int = 4  # a measurable unit unprobed for this many audits is forced into the next one
    uniform_audits: int = 2  # first audits sample uniformly (no uncertainty known yet)
    beta: float = 0.8  # EMA decay (reference 0.93–0.95 over ~30 audits; we run ~5–20 audits)
    window: int = 5  # IQR window of EMA values
    iqr_weight: float = 0.25  # score = median − λ·IQR
    exploration: float = 0.5  # knapsack value = score + exploration · uncertainty
    #: an active unit keeps its place unless the best alternative is worth this much more Dice (absolute)
    hysteresis: float = 0.002
    votes: int = 2  # consecutive allocation rounds that must ask for a flip
    guard: int = 2  # allocation rounds a flipped unit stays put
    lr: float = 2e-3  # the optimizer's learning rate (scale of the first-order estimate)
    calibration_window: int = 16  # (predicted, measured) pairs per family kept to calibrate first-order estimates
    #: realised/first-order ratios seen on the spine shift: 0.1 (norm-affine) to 9 (LoRA), docs/seapeft.md
    calibration_bounds: tuple[float, float] = (0.01, 20.0)
    history: int = 5  # recent allocations kept as final-sweep candidates
    swaps: int = 2  # single-swap neighbours tried in the final sweep (each one whole-volume pass)
    seed: int = 0
    #: "shallow": the first allocation starts from the shallow fine-tuning recipe's units (adapters/shallow.py);
    #: "none": from the first-order estimates alone
    prior: str = "shallow"
    #: families to pool (those whose adapter kind is not registered yet are skipped) and LoRA ranks
    families: tuple[str, ...] = ("lora", "lora_qv", "convlora", "salt", "adaptformer", "norm_affine", "bitfit",
                                 "dense")
    lora_ranks: tuple[int, ...] = (1, 2, 4)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_steps(cls, budget: int, steps: int, train_patches: int = 2, target_overhead: float = 0.33,
                  **overrides) -> "SeaPeftConfig":
        """The reference schedule scaled to a run of `steps` optimizer steps of `train_patches` patches.

        - audit interval a: at most 12 audits per run (the reference: 30), and long enough that the allocator costs
          at most `target_overhead` of the training time. Cost model, in forward passes of one patch (a training
          step ≈ 3 per patch): per allocation period (2 audits + 1 first-order pass) 2·(1 + k)·B + 4.5·B, against
          6·a·P of training, with k = audit_units, B = audit_patches (the buffer's cost: the whole audit volume
          counts as its voxels in patches, at most B), P = train_patches; so
          a ≥ B·(2(1 + k) + 4.5) / (6·P·target_overhead). B is the buffer's bound; the actual buffer is often
          smaller (spine: the whole audit slab, 7.5 patches), so the measured share stays under the target: on the
          spine benchmark (a = 22) 31 % of the wall time with 5 final-sweep swaps and 30 % with 2, hence 2 swaps
          and the 0.33 default (docs/seapeft.md). With the former 2-patch buffer, whose passes are too small for their fixed
          costs, the measured share was twice the model;
        - one allocation per 2 audits and a warm-up of one allocation period (as the reference);
        - votes = guard = 1/5 of the allocation rounds (the reference: 3 of 15), at least 1;
        - EMA time constant of half the audits (the reference: 1/(1 − 0.93) ≈ 14 of 30 audits).
        """
        k = overrides.get("audit_units", cls.audit_units)
        b = overrides.get("audit_patches", cls.audit_patches)
        cost_bound = b * (2 * (1 + k) + 4.5) / (6 * max(train_patches, 1) * target_overhead)
        audit_every = max(1, math.ceil(cost_bound), round(steps / 12))
        allocate_every = 2 * audit_every
        warmup = allocate_every
        rounds = max(1, (steps - warmup) // allocate_every)
        inertia = max(1, round(rounds / 5))
        audits = max(1, steps // audit_every)
        beta = min(max(1 - 2 / audits, 0.5), 0.95)
        values = dict(budget=budget, steps=steps, warmup=warmup, audit_every=audit_every,
                      allocate_every=allocate_every, votes=inertia, guard=inertia, beta=beta)
        values.update(overrides)
        return cls(**values)
