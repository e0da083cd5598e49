"""Adapter cost on a MONAI 3D UNet at 96³: train-step time and peak memory as ratios to the frozen base and to full
fine-tuning, the dense weight-gradient path against the factored one (`adapters/lowrank.py`), our LoRA against HF
peft's LoRA at the same rank, and merged inference against base inference.

    python bench/adapters.py [--rounds 7] [--threads 1] [--device cpu|cuda]
    python bench/adapters.py --layers [--rounds 7]   # per layer: calibration of the factored paths' cost rules

Times: every variant is built in one process and the steps run round-robin (one step of each variant per round,
after one warm-up round), so a load that drifts on a shared machine hits all variants alike. A step time is the
median over rounds; a ratio is the median over rounds of the ratio within one round (steps seconds apart). On a
CPU the clock is the process's CPU time, which other jobs time-slicing the cores do not inflate (they still share
caches and memory bandwidth); with one thread (the default) that is exactly the work of the step. Wall-clock ratios
are printed beside. Variants whose units give factors run on both paths: the cost rule's choice (the default) and
forced onto the dense weight gradient (the library before the factored paths). Peak memory: each variant in its own
subprocess (RSS growth over two steps on CPU, the CUDA allocator's peak on GPU). Prints Markdown tables and the
conditions (threads, load average, CPU, torch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = [
    "frozen_base", "full_finetune", "lora_r4", "peft_lora_r4", "convlora_paper_r2", "salt", "svd", "norm_affine",
    "bitfit", "adabn", "sea_pool_lora_r2_bitfit", "sea_pool_salt", "merged_inference", "base_inference",
]
#: variants whose units give factors: measured on both paths
FACTORED = ("lora_r4", "convlora_paper_r2", "salt", "svd", "sea_pool_lora_r2_bitfit", "sea_pool_salt")
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
    pools = {"sea_pool_lora_r2_bitfit": ("sea_lora_r2", "sea_bitfit"), "sea_pool_salt": ("sea_salt_r2",)}
    if variant in configs:
        A.apply_adapter(net, configs[variant], "bench")
        A.freeze_base(net)
    elif variant in pools:
        # SEA-PEFT's whole pool on the network (every family, inactive), with the named units switched on
        from PEFTAdaptLib.seapeft.pool import build_pool

        build_pool(net)
        A.freeze_base(net)
        for record in A.iter_units(net):
            record.owner.set_active(record.name, record.name in pools[variant])
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
    """Dense: the library's behaviour before the factored paths (every adapted layer takes the dense weight
    gradient); otherwise the cost rules decide."""
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


class Clock:
    """Seconds of one call: CPU time of the process on a CPU (wall time on a GPU), and wall time."""

    def __init__(self, device: str):
        self.cpu = device == "cpu"

    def __call__(self, fn) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - wall
        return (time.process_time() - cpu if self.cpu else wall), wall


def interleaved(calls: dict, rounds: int, clock: Clock, before=lambda key: None) -> dict:
    """{key: [(seconds, wall seconds) per round]}: one call of each per round, after a warm-up round."""
    times: dict = {key: [] for key in calls}
    for round_ in range(rounds + 1):
        for key, call in calls.items():
            before(key)
            measured = clock(call)
            if round_:
                times[key].append(measured)
    return times


def median_ratio(times: dict, key, reference, wall: bool = False) -> float:
    """Median over rounds of the within-round ratio."""
    return statistics.median(a[wall] / b[wall] for a, b in zip(times[key], times[reference]))


def conditions(threads: int, device: str) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{device}, {threads} thread(s), {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
            f"load average {load}")


def layer_table(rounds: int, clock: Clock) -> None:
    """Per conv geometry of the UNet and unit type: forward+backward of the layer on the dense path and the factored
    one, as ratios to the frozen layer's, beside what the cost rule picks (and whether it picked the faster)."""
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
    units = {"lora r1": A.LoRAConfig(r=1, alpha=1), "lora r4": A.LoRAConfig(r=4, alpha=4),
             "lora r16": A.LoRAConfig(r=16, alpha=16), "convlora r2": A.ConvLoRAConfig(r=2, alpha=2),
             "salt": A.SALTConfig(ratio=0.1, lora_rank=4), "svd": A.SVDConfig()}

    print(f"conditions: {conditions(torch.get_num_threads(), 'cpu')}\n")
    print("| layer | weight | input | unit | rule picks | dense / frozen | factored / frozen | rule picked the faster |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, weight, stride, size), module in shapes.items():
        x = torch.randn(1, *size)
        runs = {"frozen": (module.requires_grad_(False), "dense")}
        for name, config in units.items():
            layer = nn.Sequential(copy.deepcopy(module))
            try:
                A.apply_adapter(layer, copy.deepcopy(config), "bench")
            except (TypeError, ValueError):
                continue
            if not list(A.iter_units(layer)):  # ConvLoRA takes no transposed convolution
                continue
            A.freeze_base(layer)
            runs[(name, "dense")], runs[(name, "factored")] = (layer, "dense"), (layer, "factored")

        def call(layer):
            return lambda: layer(x.clone().requires_grad_(True)).square().mean().backward()

        times = interleaved({key: call(layer) for key, (layer, _) in runs.items()}, rounds, clock,
                            before=lambda key: setattr(lowrank, "FORCE", runs[key][1]))
        lowrank.FORCE = None
        for name in dict.fromkeys(key[0] for key in runs if key != "frozen"):
            dense, factored = (median_ratio(times, (name, path), "frozen") for path in ("dense", "factored"))
            node = type(runs[(name, "dense")][0](x.clone().requires_grad_(True)).grad_fn).__name__
            pick = "factored" if node in ("_FactoredLayerBackward", "_ProductLayerBackward") else "dense"
            faster = "yes" if (pick == "factored") == (factored < dense) else "no"
            print(f"| {kind} s{stride[0]} | {weight} | {size} | {name} | {pick} | {dense:.2f} | {factored:.2f} "
                  f"| {faster} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", action="store_true", help="per-layer calibration table of the factored paths")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock(args.device)
    if args.layers:
        layer_table(args.rounds, clock)
        return
    if args.memory:
        print(json.dumps(peak_memory(args.memory, args.device, args.dense)))
        return
    runs = [(v, False) for v in VARIANTS] + [(v, True) for v in FACTORED]
    memory = {}
    for variant, dense in runs:
        command = [sys.executable, __file__, "--memory", variant, "--device", args.device,
                   "--threads", str(args.threads)] + ["--dense"] * dense
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[(variant, dense)] = json.loads(out.stdout.strip().splitlines()[-1])
    start = conditions(args.threads, args.device)
    steps, trainable = {}, {}
    for variant, dense in runs:
        steps[(variant, dense)], trainable[variant] = make_step(variant, args.device)
    times = interleaved(steps, args.rounds, clock, before=lambda run: use_path(run[1]))

    def seconds(run) -> float:
        return statistics.median(t[0] for t in times[run])

    print(f"conditions: {start}; at the end: load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"{args.rounds} rounds\n")
    print("| variant | trainable | step (s) | step / frozen base | step / full fine-tuning | wall: step / frozen base "
          "| dense path: step (s) | dense path / frozen base | dense path / full fine-tuning "
          "| peak memory / frozen base | dense path: peak memory / frozen base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        run, dense = (variant, False), (variant, True)
        inference = variant.endswith("inference")
        reference = ("base_inference" if inference else "frozen_base", False)
        full = ("full_finetune", False)
        versus_full = "—" if inference else f"{median_ratio(times, run, full):.2f}"
        dense_cells = (f"{seconds(dense):.3f} | {median_ratio(times, dense, reference):.2f} | "
                       f"{median_ratio(times, dense, full):.2f}" if dense in times else "— | — | —")
        peak = lambda key: f"{memory[key] / memory[reference]:.2f}" if memory[reference] else "nan"  # noqa: E731
        print(f"| {variant} | {trainable[variant]:,} | {seconds(run):.3f} | {median_ratio(times, run, reference):.2f} "
              f"| {versus_full} | {median_ratio(times, run, reference, wall=True):.2f} | {dense_cells} | {peak(run)} "
              f"| {peak(dense) if dense in memory else '—'} |")
    print(f"\nour LoRA r4 step / HF peft LoRA r4 step: "
          f"{median_ratio(times, ('lora_r4', False), ('peft_lora_r4', False)):.2f}")
    print(f"merged inference / base inference: "
          f"{median_ratio(times, ('merged_inference', False), ('base_inference', False)):.2f} (target ≤ 1.02)")


if __name__ == "__main__":
    main()
