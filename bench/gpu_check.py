"""GPU check of the engine's CUDA path (bf16 autocast training and inference) against the CPU, on the real deepbet
network and a synthetic head volume (runs where only torch, MONAI and SimpleITK are installed).

    python bench/gpu_check.py --weights PATH/TO/deepbet/model.pt [--steps 10]

Prints Markdown tables: step time and inference time per device, and how far the GPU's bf16 outputs are from
the CPU's fp32 outputs (max probability difference, Dice between the two masks); then, per device, one LoRA r4
forward+backward on the same patches with the dense weight-gradient path and with the factored one (the adapter
library's cost rule), against the frozen network's forward+backward (the floor), and how far the two paths'
gradients are apart.
"""
from __future__ import annotations

import argparse
import copy
import time
import types

import numpy as np
import SimpleITK as sitk
import torch

from PEFTAdaptLib.adapters import LoRAConfig, LoRAUnit, add_units, iter_units, lowrank
from PEFTAdaptLib.data.cases import prepare_case
from PEFTAdaptLib.inference import predict_probabilities
from PEFTAdaptLib.metrics import dice
from PEFTAdaptLib.models.deepbet import CARD
from PEFTAdaptLib.models.linknet3d import load_from_torchscript
from PEFTAdaptLib.training import TrainConfig, Trainer


def synthetic_head(seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    shape = (160, 192, 160)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid[0] / 0.6) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 0.6) ** 2)
    brain = radius < 1.0
    skull = (radius >= 1.05) & (radius < 1.2)
    texture = 0.6 + 0.2 * np.sin(12 * grid[0]) * np.cos(9 * grid[1])
    image = np.where(brain, texture, 0) + 0.9 * skull + rng.normal(0, 0.03, shape)
    to_image = lambda a: sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))  # noqa: E731
    return to_image(image.astype(np.float32)), to_image(brain.astype(np.uint8))


def timed(fn, repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def backward_paths(network: torch.nn.Module, trainer: Trainer, device: str, repeat: int) -> tuple:
    """(frozen, dense, factored) forward+backward seconds on one batch, and the largest relative difference between
    the dense and the factored path's unit gradients."""
    image, label = trainer.sampler()
    image, label = image.to(device), label.to(device)
    units = list(iter_units(network))
    network.train()

    def step(path: str | None, frozen: bool = False) -> None:
        lowrank.FORCE = path
        for record in units:
            record.owner.set_active(record.name, not frozen)
            for parameter in record.unit.parameters():
                parameter.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = network(image.clone().requires_grad_(frozen))
        trainer.loss_fn(logits.float(), label).backward()

    seconds = [timed(lambda: step("dense", frozen=True), repeat), timed(lambda: step("dense"), repeat)]
    dense = [p.grad.clone() for r in units for p in r.unit.parameters()]
    seconds.append(timed(lambda: step(None), repeat))
    factored = [p.grad for r in units for p in r.unit.parameters()]
    difference = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(factored, dense))
    lowrank.FORCE = None
    return (*seconds, difference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    image, label = synthetic_head()
    case = prepare_case("synthetic", [image], CARD, label)
    base = load_from_torchscript(args.weights)
    rows, outputs, paths = [], {}, []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        network = copy.deepcopy(base)
        add_units(network, LoRAConfig(r=4, alpha=4), LoRAUnit, "lora")
        trainer = Trainer(network, CARD, [case], [types.SimpleNamespace(array=case.array, label=case.label)],
                          TrainConfig(steps=args.steps, audit_every=10**9, seed=0, device=device))
        step = timed(lambda: trainer._train_step(), args.steps)
        paths.append((device, *backward_paths(network, trainer, device, args.steps)))
        network.eval()
        probs = predict_probabilities(copy.deepcopy(base).to(device), case.array, CARD, device)
        infer = timed(lambda: predict_probabilities(network, case.array, CARD, device), 2)
        outputs[device] = probs
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append((device, step, infer, peak, float(np.mean(trainer.losses[-3:])) if trainer.losses else float(
            "nan")))
    print("| device | train step (s, 128³ ×2, LoRA r4) | inference (s, 256³) | peak GPU memory (GiB) |")
    print("|---|---|---|---|")
    for device, step, infer, peak, _ in rows:
        print(f"| {device} | {step:.3f} | {infer:.3f} | {peak:.2f} |")
    print("\n| device | frozen fwd+bwd (s) | LoRA r4, dense path (s) | LoRA r4, factored (s) | dense / frozen "
          "| factored / frozen | gradients, max relative difference |")
    print("|---|---|---|---|---|---|---|")
    for device, frozen, dense, factored, difference in paths:
        print(f"| {device} | {frozen:.3f} | {dense:.3f} | {factored:.3f} | {dense / frozen:.2f} | "
              f"{factored / frozen:.2f} | {difference:.1e} |")
    if "cuda" in outputs:
        diff = float(np.abs(outputs["cuda"] - outputs["cpu"]).max())
        agreement = dice(outputs["cuda"].argmax(0) == 1, outputs["cpu"].argmax(0) == 1)
        print(f"\nbase model, GPU bf16 autocast vs CPU fp32: max |Δp| = {diff:.4f}, Dice of the masks = {agreement:.5f}")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
