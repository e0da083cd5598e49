"""What SEA-PEFT's first allocation should have known: every pool unit's step-0 estimates against the gain it
realises when trained alone on the support for k steps (spine T2 → T1, the development shift; audit case only).

    python bench/seapeft_probe.py [--steps 40] [--limit N]

Estimates (all from the untouched source with the whole pool switched on, one pass each):
- `audit_l1`: η·k·‖∂D_audit/∂θ‖₁, the allocator's estimate until now — as if the unit trained on the audit itself;
- `transfer`: η·k·⟨∂D_audit/∂θ, Adam's first direction on the support loss⟩ (mean/RMS of n support gradients) —
  what training on the *support* does to the audit, to first order; negative where the two disagree.
Realised: Δ soft Dice on the audit buffer and Δ whole-volume Dice of the audit case after k steps of the unit alone.
Prints Spearman correlations and the rows; raw rows go to bench/.cache/seapeft-probe-<shift>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocation import settings  # noqa: E402
from shifts import CACHE, SHIFTS  # noqa: E402

from PEFTAdaptLib.adapters import freeze_base, iter_units  # noqa: E402
from PEFTAdaptLib.adapters.shallow import shallow_layers  # noqa: E402
from PEFTAdaptLib.seapeft import build_pool  # noqa: E402
from PEFTAdaptLib.seapeft.audit import AuditBuffer  # noqa: E402
from PEFTAdaptLib.training import PatchSampler, TrainConfig, audit_dice, supervised_trainer  # noqa: E402


def support_direction(network, records, sampler, batches: int) -> dict[str, list[torch.Tensor]]:
    """Adam's first-step direction per unit parameter on the support loss: −mean(g)/RMS(g) over `batches`."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    params = {n: list(r.unit.parameters()) for n, r in records.items()}
    flat = [p for ps in params.values() for p in ps]
    total = [torch.zeros_like(p) for p in flat]
    squares = [torch.zeros_like(p) for p in flat]
    network.eval()
    for _ in range(batches):
        image, label = sampler()
        grads = torch.autograd.grad(loss_fn(network(image), label), flat, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                total[i] += g / batches
                squares[i] += g * g / batches
    direction = [-m / (s.sqrt() + 1e-12) for m, s in zip(total, squares)]
    out, index = {}, 0
    for name, ps in params.items():
        out[name] = direction[index:index + len(ps)]
        index += len(ps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shift", default="spine")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=4, help="support batches for Adam's first direction")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=0, help="probe only the first N units (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shift = SHIFTS[args.shift]("cpu")
    s = settings("spine", quick=True, steps=None)
    network = shift.make_network()
    shallow = set(shallow_layers(network, torch.zeros(1, 1, *shift.card.patch_size)))
    pool = build_pool(network, max_cost=int(args.budget * shift.total_parameters))
    freeze_base(network)
    records = {f"{r.layer}::{r.name}": r for r in iter_units(network)}
    buffer = AuditBuffer(shift.audit, shift.card.patch_size, 2, 0)
    for r in records.values():
        r.owner.set_active(r.name, True)
    base, norms = buffer.gradients(network, {u.name: list(records[u.name].unit.parameters()) for u in pool})
    value = buffer._pooled(network)
    audit_grads = torch.autograd.grad(value, [p for u in pool for p in records[u.name].unit.parameters()],
                                      allow_unused=True)
    sampler = PatchSampler(shift.support, shift.card.patch_size, s.patches, 0.5, 123)
    direction = support_direction(network, {u.name: records[u.name] for u in pool}, sampler, args.batches)
    for r in records.values():
        r.owner.set_active(r.name, False)
    zero_audit = audit_dice(network, shift.audit, shift.card, "cpu")
    rows, index = [], 0
    for unit in pool[: args.limit or None]:
        unit_params = list(records[unit.name].unit.parameters())
        grads = audit_grads[index:index + len(unit_params)]
        index += len(unit_params)
        lr = s.lr * records[unit.name].unit.lr_scale
        transfer = sum(float((g * d).sum()) for g, d in zip(grads, direction[unit.name]) if g is not None)
        trial = copy.deepcopy(network)
        record = next(r for r in iter_units(trial) if f"{r.layer}::{r.name}" == unit.name)
        record.owner.set_active(record.name, True)
        config = TrainConfig(steps=args.steps, lr=s.lr, patches_per_step=s.patches, audit_every=10_000, seed=0)
        trainer = supervised_trainer(trial, shift.card, shift.support, shift.audit, config)
        trainer.history.append((0, zero_audit))  # skip the step-0 audit: the source's is known
        trainer.run()
        trial.eval()
        rows.append({"unit": unit.name, "family": unit.family, "cost": unit.cost, "shallow": unit.site in shallow,
                     "audit_l1": lr * args.steps * norms[unit.name], "transfer": lr * args.steps * transfer,
                     "buffer_gain": buffer.dice(trial) - base,
                     "audit_gain": trainer.history[-1][1] - zero_audit})  # its last-step whole-volume audit
        print(json.dumps(rows[-1]), flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"seapeft-probe-{args.shift}.json").write_text(json.dumps(rows, indent=1))
    from scipy.stats import spearmanr

    for estimate in ("audit_l1", "transfer"):
        for realised in ("buffer_gain", "audit_gain"):
            rho = spearmanr([r[estimate] for r in rows], [r[realised] for r in rows]).statistic
            print(f"Spearman({estimate}, {realised}) = {rho:.2f}")


if __name__ == "__main__":
    main()
