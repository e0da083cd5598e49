"""GPU check of the engine's CUDA path (bf16 autocast training and inference) against the CPU, on the real deepbet
network and a synthetic head volume (runs where only torch, MONAI and SimpleITK are installed).

    python bench/gpu_check.py [--weights PATH/TO/deepbet/model.pt] [--steps 10] [--patch 128] [--roi 256]
    python bench/gpu_check.py --steps 1 --patch 64 --roi 64 --devices cpu   # a quick run of the script itself

Training runs through the product's trainer (`supervised_trainer`: patches, augmentation, Dice + CE, AdamW; bf16
autocast on CUDA). Prints Markdown tables: train step and inference time per device, the step's patches and
augmentation alone, the step against the frozen network's forward+backward (and the GPU's utilisation over the
steps, where pynvml reports it); how far the GPU's bf16 outputs are from the CPU's fp32 outputs (max probability
difference, Dice between the two masks) and its training patches from the CPU's (same seed); then, per device and
adapter (LoRA r4, SALT), one forward+backward on the same patches with the dense weight-gradient path and with the
cost rules' choice (the factored / product form), against the frozen network's forward+backward (the floor), and
how far the two paths' gradients are apart.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import SimpleITK as sitk
import torch

from PEFTAdaptLib.adapters import LoRAConfig, SALTConfig, apply_adapter, iter_units, lowrank
from PEFTAdaptLib.data.augment import AugmentationConfig
from PEFTAdaptLib.data.cases import prepare_case
from PEFTAdaptLib.inference import predict_probabilities
from PEFTAdaptLib.metrics import dice
from PEFTAdaptLib.models.deepbet import CARD, deepbet_weights_path
from PEFTAdaptLib.models.linknet3d import load_from_torchscript
from PEFTAdaptLib.training import SupervisedObjective, TrainConfig, Trainer, supervised_trainer

ADAPTERS = {"LoRA r4": LoRAConfig(r=4, alpha=4), "SALT": SALTConfig(ratio=0.1, lora_rank=4)}
TRAINED = "LoRA r4"  # the adapter the training row trains
PATCH_DRAWS = 4  # augmented batches compared between the devices


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


def with_utilisation(fn, device: str) -> tuple:
    """(fn(), the mean GPU utilisation (%) while it ran, sampled by NVML every 50 ms); NaN off CUDA or without
    pynvml."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if device != "cuda" or pynvml is None:
        return fn(), float("nan")
    import threading

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    thread = threading.Thread(target=sample)
    thread.start()
    result = fn()
    done.set()
    thread.join()
    return result, float(np.mean(samples)) if samples else float("nan")


def backward_paths(network: torch.nn.Module, trainer: Trainer, device: str, repeat: int) -> tuple:
    """(frozen, dense, cost rule) forward+backward seconds on one batch, and the largest relative difference between
    the dense and the cost rule's unit gradients."""
    objective = trainer.objective
    image, label = objective.sampler()
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
        objective.loss_fn(logits.float(), label).backward()

    seconds = [timed(lambda: step("dense", frozen=True), repeat), timed(lambda: step("dense"), repeat)]
    dense = [p.grad.clone() for r in units for p in r.unit.parameters()]
    seconds.append(timed(lambda: step(None), repeat))
    chosen = [p.grad for r in units for p in r.unit.parameters()]
    difference = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(chosen, dense))
    lowrank.FORCE = None
    return (*seconds, difference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", help="deepbet's model.pt (default: the one in the installed deepbet wheel)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--patch", type=int, default=CARD.patch_size[0], help="training patch edge (voxels)")
    parser.add_argument("--roi", type=int, default=CARD.inference_roi[0], help="inference window edge (voxels)")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()
    card = dataclasses.replace(CARD, patch_size=(args.patch,) * 3, inference_roi=(args.roi,) * 3)
    image, label = synthetic_head()
    case = prepare_case("synthetic", [image], card, label)
    base = load_from_torchscript(str(args.weights or deepbet_weights_path()))
    rows, outputs, paths, patches = [], {}, [], {}
    for device in args.devices:
        network = copy.deepcopy(base)
        apply_adapter(network, ADAPTERS[TRAINED], "lora")
        config = TrainConfig(steps=args.steps, lr=1e-3, patches_per_step=2, audit_every=10**9, seed=0, device=device)
        trainer = supervised_trainer(network, card, [case], [case], config)
        objective = SupervisedObjective([case], card.patch_size, config.patches_per_step, config.pos_fraction,
                                        config.seed, AugmentationConfig.from_card(card.extra), device)  # own draws
        patches[device] = [objective.augment(*objective.sampler()) for _ in range(PATCH_DRAWS)]
        data = timed(lambda: objective.augment(*objective.sampler()), args.steps)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        losses: list[float] = []
        step, busy = with_utilisation(lambda: timed(lambda: losses.append(trainer._train_step()), args.steps), device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        for name, adapter in ADAPTERS.items():
            adapted = copy.deepcopy(base).to(device)
            apply_adapter(adapted, copy.deepcopy(adapter), "unit")
            paths.append((device, name, *backward_paths(adapted, supervised_trainer(adapted, card, [case], [case],
                                                                                     config), device, args.steps)))
        network.eval()
        outputs[device] = predict_probabilities(copy.deepcopy(base).to(device), case.array, card, device)
        infer = timed(lambda: predict_probabilities(network, case.array, card, device), 2)
        floor = next(frozen for where, name, frozen, *_ in paths if where == device and name == TRAINED)
        rows.append((device, step, data, step / floor, infer, peak, busy, float(np.mean(losses[-3:]))))
    patch = f"{args.patch}³ ×2"
    print(f"| device | train step (s, {patch}, {TRAINED}) | of which patches + augmentation (s) "
          f"| step / frozen fwd+bwd | GPU utilisation in steps (%) | inference (s, {args.roi}³) "
          "| peak GPU memory (GiB) | loss, last steps |")
    print("|---|---|---|---|---|---|---|---|")
    for device, step, data, ratio, infer, peak, busy, loss in rows:
        print(f"| {device} | {step:.3f} | {data:.3f} | {ratio:.2f} | {busy:.0f} | {infer:.3f} | {peak:.2f} "
              f"| {loss:.3f} |")
    print("\n| device | adapter | frozen fwd+bwd (s) | dense path (s) | cost rule (s) | dense / frozen "
          "| cost rule / frozen | gradients, max relative difference |")
    print("|---|---|---|---|---|---|---|---|")
    for device, name, frozen, dense, chosen, difference in paths:
        print(f"| {device} | {name} | {frozen:.3f} | {dense:.3f} | {chosen:.3f} | {dense / frozen:.2f} | "
              f"{chosen / frozen:.2f} | {difference:.1e} |")
    if "cuda" in outputs and "cpu" in outputs:
        diff = float(np.abs(outputs["cuda"] - outputs["cpu"]).max())
        agreement = dice(outputs["cuda"].argmax(0) == 1, outputs["cpu"].argmax(0) == 1)
        print(f"\nbase model, GPU bf16 autocast vs CPU fp32: max |Δp| = {diff:.4f}, Dice of the masks = {agreement:.5f}")
        pairs = [(a.detach().cpu(), b) for draw_a, draw_b in zip(patches["cuda"], patches["cpu"])
                 for a, b in zip(draw_a, draw_b)]
        image_gap = max(float((a - b).abs().max()) for a, b in pairs[::2])
        label_gap = max(float((a != b).float().mean()) for a, b in pairs[1::2])
        print(f"training patches, {PATCH_DRAWS} draws cut and augmented on the GPU vs the CPU (same seed): "
              f"max |Δ image| = {image_gap:.1e}, labels differing in {100 * label_gap:.3f} % of voxels at most")
    if "cuda" in outputs:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
