"""Adapter cost on a MONAI 3D UNet at 96³: train-step time and peak memory as ratios to the frozen base, our LoRA
against HF peft's LoRA at the same rank, and merged inference against base inference.

    python bench/adapters.py [--steps 4] [--device cpu|cuda]

Each variant runs in its own subprocess (clean peak-memory reading: RSS growth over the step loop on CPU, the CUDA
allocator's peak on GPU); times are medians of `--steps` steps after one warm-up. Prints a Markdown table.
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
    "bitfit", "adabn", "merged_inference", "base_inference",
]


def build(variant: str):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    from PEFTAdaptLib import adapters as A

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


def run_variant(variant: str, steps: int, device: str) -> dict:
    import psutil
    import torch

    torch.set_num_threads(torch.get_num_threads())
    net = build(variant).to(device)
    x = torch.randn(1, 1, 96, 96, 96, device=device)
    target = torch.randint(0, 2, (1, 96, 96, 96), device=device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    inference = variant.endswith("inference")

    def step():
        if inference:
            with torch.no_grad():
                net(x)
            return
        inputs = x.clone().requires_grad_(not trainable)  # frozen base: backward to the input only
        loss = torch.nn.functional.cross_entropy(net(inputs), target)
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    rss_before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"variant": variant, "seconds": statistics.median(times), "peak_bytes": max(peak, 0),
            "trainable": sum(p.numel() for p in trainable) if not inference else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.device)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                              "--device", args.device], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base, infer = results["frozen_base"], results["base_inference"]
    print(f"| variant | trainable | step (s) | step / frozen base | peak memory / frozen base |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        r = results[variant]
        reference = infer if variant.endswith("inference") else base
        memory = r["peak_bytes"] / reference["peak_bytes"] if reference["peak_bytes"] else float("nan")
        print(f"| {variant} | {r['trainable']:,} | {r['seconds']:.3f} | {r['seconds'] / reference['seconds']:.2f} "
              f"| {memory:.2f} |")
    ours, theirs = results["lora_r4"], results["peft_lora_r4"]
    print(f"\nour LoRA r4 step / HF peft LoRA r4 step: {ours['seconds'] / theirs['seconds']:.2f} (target ≤ 1.05)")
    print(f"merged inference / base inference: {results['merged_inference']['seconds'] / infer['seconds']:.2f} "
          "(target ≤ 1.02)")


if __name__ == "__main__":
    main()
