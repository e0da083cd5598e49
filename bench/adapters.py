"""Adapter cost on a MONAI 3D UNet at 96³: train-step time and peak memory as ratios to the frozen base, the dense
weight-gradient path against the factored (low-rank) one, our LoRA against HF peft's LoRA at the same rank, and
merged inference against base inference.

    python bench/adapters.py [--rounds 7] [--device cpu|cuda]
    python bench/adapters.py --layers [--rounds 5]   # per-layer calibration of the factored path's cost rule

Times: every variant is built in one process and the steps run round-robin (one step of each variant per round,
after one warm-up round), so a load that drifts on a shared machine hits all variants alike. A step time is the
median over rounds; a ratio is the median over rounds of the ratio within one round (both steps seconds apart).
Variants whose units are low-rank run twice, with the factored backward (the default) and forced onto the dense
weight-gradient path (the library's behaviour before the factored path).
Peak memory: each variant in its own subprocess (RSS growth over two steps on CPU, the CUDA allocator's peak on
GPU). Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = [
    "frozen_base", "full_finetune", "lora_r4", "peft_lora_r4", "convlora_paper_r2", "salt", "svd", "norm_affine",
    "bitfit", "adabn", "sea_pool_lora_r2_bitfit", "merged_inference", "base_inference",
]
#: variants with low-rank units: measured on both paths
FACTORED = ("lora_r4", "convlora_paper_r2", "sea_pool_lora_r2_bitfit")
INPUT = (96, 96, 96)


def unet():
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)


def build(variant: str):
    import torch

    from PEFTAdaptLib import adapters as A

    net = unet()
    convs = tuple(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d))  # the layers peft adapts too
    configs = {
        "lora_r4": A.LoRAConfig(r=4, alpha=4, target_modules=convs),
        "convlora_paper_r2": A.ConvLoRAConfig(r=2, alpha=2),
        "salt": A.SALTConfig(ratio=0.1, lora_rank=4),
        "svd": A.SVDConfig(),
        "norm_affine": A.NormAffineConfig(),
        "bitfit": A.BitFitConfig(),
        "adabn": A.AdaBNConfig(),
    }
    if variant in configs:
        A.apply_adapter(net, configs[variant], "bench")
        A.freeze_base(net)
    elif variant == "sea_pool_lora_r2_bitfit":
        # SEA-PEFT's whole pool on the network (every family, inactive), with LoRA r2 and BitFit switched on
        from PEFTAdaptLib.seapeft.pool import build_pool

        build_pool(net)
        A.freeze_base(net)
        for record in A.iter_units(net):
            record.owner.set_active(record.name, record.name in ("sea_lora_r2", "sea_bitfit"))
    elif variant == "peft_lora_r4":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=list(convs)))
    elif variant == "merged_inference":
        A.apply_adapter(net, A.LoRAConfig(r=4, alpha=4, target_modules=convs), "bench")
        A.merge_and_unload(net)
    elif variant in ("frozen_base", "base_inference"):
        for p in net.parameters():
            p.requires_grad_(False)
    return net


def use_path(dense: bool) -> None:
    """Dense: the library's behaviour before the factored path (every adapted layer takes the dense weight
    gradient); otherwise the cost rule decides."""
    from PEFTAdaptLib.adapters import lowrank

    lowrank.FORCE = "dense" if dense else None


def make_step(variant: str, device: str):
    """(one training step — or inference pass — of the variant, its trainable parameter count)."""
    import torch

    from PEFTAdaptLib.adapters import count_trainable

    net = build(variant).to(device)
    x = torch.randn(1, 1, *INPUT, device=device)
    target = torch.randint(0, 2, (1, *INPUT), device=device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    inference = variant.endswith("inference")

    def step():
        if inference:
            with torch.no_grad():
                net(x)
        else:
            inputs = x.clone().requires_grad_(not trainable)  # frozen base: backward to the input only
            torch.nn.functional.cross_entropy(net(inputs), target).backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    counted = count_trainable(net) if variant.startswith("sea_pool") else sum(p.numel() for p in trainable)
    return step, 0 if inference else counted


def peak_memory(variant: str, device: str, dense: bool) -> int:
    import psutil
    import torch

    use_path(dense)
    step, _ = make_step(variant, device)
    step()
    rss_before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before, 0)


def interleaved_times(runs: list[tuple[str, bool]], rounds: int, device: str) -> tuple[dict, dict]:
    """Seconds per step of every run, one step of each per round (after a warm-up round); trainable counts."""
    steps, trainable = {}, {}
    for variant, dense in runs:
        steps[(variant, dense)], trainable[variant] = make_step(variant, device)
    times: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for round_ in range(rounds + 1):
        for run in runs:
            use_path(run[1])
            start = time.perf_counter()
            steps[run]()
            if round_:
                times[run].append(time.perf_counter() - start)
    return times, trainable


def layer_table(rounds: int) -> None:
    """Per conv geometry of the UNet and LoRA rank: the extra time of the factored backward over the frozen layer's
    forward+backward against the dense path's, beside what the cost rule (`lowrank.factored_is_cheaper`) picks."""
    import copy

    import torch
    from torch import nn

    from PEFTAdaptLib import adapters as A
    from PEFTAdaptLib.adapters import lowrank

    shapes = {}

    def record(module, inputs, output):
        key = (type(module).__name__, tuple(module.weight.shape), module.stride, tuple(inputs[0].shape[1:]))
        shapes.setdefault(key, module)

    net = unet()
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        net(torch.randn(1, 1, *INPUT))
    for hook in hooks:
        hook.remove()

    def timed(runs: dict, x: torch.Tensor) -> dict:
        """Fastest of `rounds` forward+backward passes per (layer, path), interleaved: on a shared machine the
        minimum is the least disturbed reading."""
        best = {key: float("inf") for key in runs}
        for _ in range(rounds + 1):
            for key, (layer, path) in runs.items():
                lowrank.FORCE = path
                inputs = x.clone().requires_grad_(True)
                start = time.perf_counter()
                layer(inputs).square().mean().backward()
                best[key] = min(best[key], time.perf_counter() - start)
        return best

    print("| layer | weight | input | rank | rule picks | extra time factored / dense | dense step / frozen "
          "| factored step / frozen |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, weight, stride, size), module in shapes.items():
        x = torch.randn(1, *size)
        runs = {"frozen": (module.requires_grad_(False), "dense")}
        for rank in (1, 2, 4, 8, 16):
            layer = nn.Sequential(copy.deepcopy(module))
            A.apply_adapter(layer, A.LoRAConfig(r=rank, alpha=rank), "bench")
            A.freeze_base(layer)
            if next(A.iter_units(layer)).unit.rank == rank:
                runs[(rank, "dense")], runs[(rank, "factored")] = (layer, "dense"), (layer, "factored")
        best = timed(runs, x)
        frozen = best["frozen"]
        for rank in sorted({key[0] for key in runs if key != "frozen"}):
            dense, factored = best[(rank, "dense")], best[(rank, "factored")]
            lowrank.FORCE = None
            pick = "factored" if lowrank.factored_is_cheaper(module, rank) else "dense"
            print(f"| {kind} s{stride[0]} | {weight} | {size} | {rank} | {pick} | "
                  f"{(factored - frozen) / max(dense - frozen, 1e-9):.2f} | {dense / frozen:.2f} | {factored / frozen:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", action="store_true", help="per-layer calibration table of the factored path")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers:
        layer_table(args.rounds)
        return
    if args.memory:
        print(json.dumps(peak_memory(args.memory, args.device, args.dense)))
        return
    runs = [(v, False) for v in VARIANTS] + [(v, True) for v in FACTORED]
    memory = {}
    for variant, dense in runs:
        command = [sys.executable, __file__, "--memory", variant, "--device", args.device] + (["--dense"] * dense)
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[(variant, dense)] = json.loads(out.stdout.strip().splitlines()[-1])
    times, trainable = interleaved_times(runs, args.rounds, args.device)

    def seconds(run) -> float:
        return statistics.median(times[run])

    def ratio(run, reference) -> float:
        return statistics.median(a / b for a, b in zip(times[run], times[reference]))

    print("| variant | trainable | step (s) | step / frozen base | step / full fine-tuning | dense path: step (s) "
          "| dense path / frozen base | peak memory / frozen base |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        run = (variant, False)
        inference = variant.endswith("inference")
        reference = ("base_inference" if inference else "frozen_base", False)
        versus_full = "—" if inference else f"{ratio(run, ('full_finetune', False)):.2f}"
        dense = (variant, True)
        dense_cells = f"{seconds(dense):.3f} | {ratio(dense, reference):.2f}" if dense in times else "— | —"
        peak = memory[run] / memory[reference] if memory[reference] else float("nan")
        print(f"| {variant} | {trainable[variant]:,} | {seconds(run):.3f} | {ratio(run, reference):.2f} "
              f"| {versus_full} | {dense_cells} | {peak:.2f} |")
    print(f"\nour LoRA r4 step / HF peft LoRA r4 step: {ratio(('lora_r4', False), ('peft_lora_r4', False)):.2f}")
    print(f"merged inference / base inference: {ratio(('merged_inference', False), ('base_inference', False)):.2f} "
          "(target ≤ 1.02)")


if __name__ == "__main__":
    main()
