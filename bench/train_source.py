"""Train the benchmark's source models from the shared data (the weights are never committed):

    python bench/train_source.py --task brats [--steps 300] [--device cpu]   # FLAIR of the four BraTS patients
    python bench/train_source.py --task spine [--steps 800]                  # T2 of spinal-cord subject A

A MONAI UNet (4.8 M parameters, instance norm) trained from scratch: random 2 × patch crops (half centred on the
label), random flips and a mild intensity scale/shift, Dice + CE, AdamW 1e-3 with cosine decay. Saved as
`bench/.cache/<task>_source.safetensors` + `.json` (settings, seed, training cases, and the source-domain Dice
as a sanity check — on the training FLAIRs for BraTS, on the other subject's T2 for the spine: the source model
must be good on its own contrast for the shift to mean anything). `bench/allocation.py` calls `load_source`, which trains the model first when the cache is empty.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shifts import CACHE, CARDS, brats_case, spine_source_cases, unet  # noqa: E402

DEFAULT_STEPS = {"brats": 300, "spine": 800}


def source_cases(task: str):
    """(training cases, held-out source-contrast cases for the sanity check)."""
    if task == "brats":  # FLAIR of all four shared patients (issue #4); the in-domain fit is the sanity check
        cases = [brats_case(p, "Flair") for p in (3, 4, 5, 6)]
        return cases, cases
    from shifts import _central, _read_pair, spine_case

    other = spine_case(*_central(*_read_pair("ivadomed/spine_unf01/sub-unf01_T2w.nii.gz",
                                             "ivadomed/spine_unf01/sub-unf01_T2w_seg-manual.nii.gz")), "B_t2")
    return spine_source_cases(), [other]


def paths(task: str) -> tuple[Path, Path]:
    return CACHE / f"{task}_source.safetensors", CACHE / f"{task}_source.json"


def train(task: str, steps: int, device: str = "cpu", seed: int = 0) -> dict:
    from monai.losses import DiceCELoss
    from safetensors.torch import save_file

    from PEFTAdaptLib.metrics import dice
    from PEFTAdaptLib.inference import predict_probabilities
    from PEFTAdaptLib.training import PatchSampler

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    card = CARDS[task]
    train_cases, held_out = source_cases(task)
    network = unet(task).to(device)
    sampler = PatchSampler(train_cases, card.patch_size, 2, 0.5, seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, losses = time.monotonic(), []
    network.train()
    for step in range(1, steps + 1):
        image, label = sampler()
        for axis in range(3):
            if rng.random() < 0.5:
                image, label = image.flip(axis + 2), label.flip(axis + 2)
        image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
        loss = loss_fn(network(image.to(device)), label.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"{task} step {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.monotonic() - start:.0f} s)",
                  flush=True)
    network.eval()
    sanity = {}
    for case in held_out:
        prediction = predict_probabilities(network, case.array, card, device).argmax(0)
        sanity[case.name] = dice(prediction == 1, case.label[0] == 1)
    weights, meta = paths(task)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(weights))
    info = {"task": task, "steps": steps, "seed": seed, "device": device, "seconds": time.monotonic() - start,
            "training_cases": [c.name for c in train_cases], "final_loss": float(np.mean(losses[-50:])),
            "held_out_source_dice": sanity, "parameters": sum(p.numel() for p in network.parameters())}
    meta.write_text(json.dumps(info, indent=2))
    return info


def load_source(task: str, device: str = "cpu", train_if_missing: bool = True) -> torch.nn.Module:
    from safetensors.torch import load_file

    weights, _ = paths(task)
    if not weights.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"{weights}: run `python bench/train_source.py --task {task}` first")
        print(f"no cached {task} source model: training it ({DEFAULT_STEPS[task]} steps)", flush=True)
        train(task, DEFAULT_STEPS[task], device)
    network = unet(task)
    network.load_state_dict(load_file(str(weights)))
    return network.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(CARDS), required=True)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.device == "cpu" else torch.get_num_threads())
    info = train(args.task, args.steps or DEFAULT_STEPS[args.task], args.device, args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
