"""Train the benchmark's source models from the shared data and write them as MONAI bundles (the weights are never
committed), so that `peftadapt adapt --model bench/.cache/models/<task>` and the benchmarks load them as a user's
model folder:

    python bench/train_source.py --task brats [--steps 300] [--device cpu]   # FLAIR of the four BraTS patients
    python bench/train_source.py --task spine [--steps 800]                  # T2 of spinal-cord subject A
    python bench/train_source.py --task brats-2d [--steps 600]               # axial FLAIR slices, a 2D UNETR

A MONAI UNet (4.8 M parameters, instance norm) trained from scratch: random 2 × patch crops (half centred on the
label), random flips and a mild intensity scale/shift, Dice + CE, AdamW 1e-3 with cosine decay. The bundle holds
`configs/inference.json` (network, orientation, spacing, intensity scheme, sliding-window ROI), `configs/train.json`
(the training crop: the patch adaptation trains on), `configs/metadata.json` (labels), `models/model.safetensors`
and `training.json` (settings, seed, cases, and the source-domain Dice as a sanity check — on the training FLAIRs
for BraTS, on the other subject's T2 for the spine: the source must be good on its own contrast for the shift to
mean anything). `source_model(task)` trains the model first when the cache is empty.
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
from shifts import CACHE, brats_images, central, read_pair  # noqa: E402

SOURCE_SLICES = (-8, -4, 0, 4, 8)  # brats-2d: axial slices (mm from the tumour's middle) each patient gives

from PEFTAdaptLib.models.card import LabelInfo, ModelCard  # noqa: E402

MODELS = CACHE / "models"
DEFAULT_STEPS = {"brats": 300, "brats-tc": 300, "spine": 800, "brats-2d": 600}
#: the source architecture: MONAI's UNet (16–256 channels, 2 residual units, instance norm, 4.8 M parameters); the
#: spine variant keeps the last level at 1/8 resolution (cord volumes are 16 slices thin)
NETWORKS = {task: {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                   "channels": [16, 32, 64, 128, 256], "strides": strides, "num_res_units": 2}
            for task, strides in (("brats", [2, 2, 2, 2]), ("brats-tc", [2, 2, 2, 2]), ("spine", [2, 2, 2, 1]))}
#: the 2D source: a small UNETR (ViT encoder of 12 blocks, width 96, 4 heads, fused qkv; 16-pixel patches of a
#: 64 × 64 input at 2 mm) — the ViT-foundation-model case at a size two CPU cores train
NETWORKS["brats-2d"] = {"_target_": "monai.networks.nets.UNETR", "spatial_dims": 2, "in_channels": 1,
                        "out_channels": 2, "img_size": [64, 64], "feature_size": 8, "hidden_size": 96,
                        "mlp_dim": 192, "num_heads": 4, "qkv_bias": True}
PERCENTILES = (0.5, 99.5)


def _card(task: str, spacing, normalization: dict, patch, roi, divisible: int, name: str) -> ModelCard:
    return ModelCard(
        id=f"bench-{task}", title=f"benchmark source model ({task})", description="trained by bench/train_source.py",
        modality="MR", input_channels=1, spacing=spacing, orientation="RAS" if len(roi) == 3 else "",
        normalization=normalization, patch_size=patch, inference_roi=roi,
        labels=[LabelInfo(0, "background"), LabelInfo(1, name)],
        license="CC BY-NC-SA 3.0 data" if task.startswith("brats") else "MIT data", source="bench/train_source.py",
        divisible_by=divisible, spatial_dims=len(roi),
    )


CARDS = {
    "brats": _card("brats", (2.0, 2.0, 2.0), {"name": "none"}, (64, 64, 64), (96, 96, 96), 16, "whole tumour"),
    "brats-tc": _card("brats-tc", (2.0, 2.0, 2.0), {"name": "none"}, (64, 64, 64), (96, 96, 96), 16, "tumour core"),
    "spine": _card("spine", (1.0, 1.0, 1.0), {"name": "percentile_zscore", "p_low": PERCENTILES[0],
                                              "p_high": PERCENTILES[1]}, (32, 32, 16), (64, 64, 32), 8, "spinal cord"),
    "brats-2d": _card("brats-2d", (2.0, 2.0), {"name": "none"}, (64, 64), (64, 64), 16, "whole tumour"),
}


def network(task: str):
    import monai.networks.nets as nets

    arguments = dict(NETWORKS[task])
    return getattr(nets, arguments.pop("_target_").rsplit(".", 1)[-1])(**arguments)


def source_cases(task: str):
    """(training cases, held-out source-contrast cases for the sanity check), on the model's grid."""
    from PEFTAdaptLib.data.cases import prepare_case

    card = CARDS[task]
    if task == "brats-2d":  # axial FLAIR slices of all four patients
        from planar import slices

        cases = [prepare_case(f"pat{p}_flair_{z}", [image], card, label)
                 for p in (3, 4, 5, 6) for z, (image, label) in slices(p, "Flair", SOURCE_SLICES).items()]
        return cases, cases
    if task.startswith("brats"):  # FLAIR of all four shared patients; the in-domain fit is the sanity check
        cases = [prepare_case(f"pat{p}_flair", [image], card, label)
                 for p, (image, label) in ((p, brats_images(p, "Flair", task)) for p in (3, 4, 5, 6))]
        return cases, cases
    image, label = read_pair("spine/t2/t2.nii.gz", "spine/t2/t2_seg-manual.nii.gz")
    other = central(*read_pair("ivadomed/spine_unf01/sub-unf01_T2w.nii.gz",
                               "ivadomed/spine_unf01/sub-unf01_T2w_seg-manual.nii.gz"))
    return [prepare_case("A_t2", [image], card, label)], [prepare_case("B_t2", [other[0]], card, other[1])]


def _preprocessing(card: ModelCard) -> list[dict]:
    steps = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
             *([{"_target_": "Orientationd", "keys": "image", "axcodes": card.orientation}] if card.orientation else []),
             {"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing), "mode": "bilinear"}]
    if card.normalization["name"] == "percentile_zscore":
        steps += [{"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": card.normalization["p_low"],
                   "upper": card.normalization["p_high"], "b_min": 0.0, "b_max": 1.0, "clip": True},
                  {"_target_": "NormalizeIntensityd", "keys": "image"}]
    return steps


def write_bundle(folder: Path, task: str, state: dict, info: dict) -> Path:
    """The trained network as a MONAI bundle whose card (read by PEFTAdapt) is `CARDS[task]`."""
    from safetensors.torch import save_file

    card = CARDS[task]
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    inference = {"network_def": NETWORKS[task],
                 "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(card)},
                 "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(card.inference_roi),
                             "sw_batch_size": 1, "overlap": 0.25}}
    train = {"train": {"preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
         "spatial_size": list(card.patch_size), "pos": 1, "neg": 1, "num_samples": 2}]}}}
    metadata = {"name": card.title, "version": "1.0", "description": card.description, "license": card.license,
                "network_data_format": {
                    "inputs": {"image": {"modality": card.modality, "num_channels": 1,
                                         "spatial_shape": [f"{card.divisible_by}*n"] * card.spatial_dims}},
                    "outputs": {"pred": {"channel_def": {str(l.value): l.name for l in card.labels}}}}}
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (folder / "configs" / "train.json").write_text(json.dumps(train, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "models" / "model.safetensors"))
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    return folder


def train(task: str, steps: int, device: str = "cpu", seed: int = 0) -> dict:
    from monai.losses import DiceCELoss

    from PEFTAdaptLib.inference import predict_probabilities
    from PEFTAdaptLib.metrics import dice
    from PEFTAdaptLib.training import PatchSampler

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    card = CARDS[task]
    train_cases, held_out = source_cases(task)
    net = network(task).to(device)
    sampler = PatchSampler(train_cases, card.patch_size, 2, 0.5, seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, losses = time.monotonic(), []
    net.train()
    for step in range(1, steps + 1):
        image, label = sampler()
        for axis in range(card.spatial_dims):
            if rng.random() < 0.5:
                image, label = image.flip(axis + 2), label.flip(axis + 2)
        image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
        loss = loss_fn(net(image.to(device)), label.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"{task} step {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.monotonic() - start:.0f} s)",
                  flush=True)
    net.eval()
    sanity = {case.name: dice(predict_probabilities(net, case.array, card, device).argmax(0) == 1,
                              case.label[0] == 1) for case in held_out}
    info = {"task": task, "steps": steps, "seed": seed, "device": device, "seconds": time.monotonic() - start,
            "training_cases": [c.name for c in train_cases], "final_loss": float(np.mean(losses[-50:])),
            "held_out_source_dice": sanity, "parameters": sum(p.numel() for p in net.parameters())}
    write_bundle(MODELS / task, task, net.state_dict(), info)
    return info


def source_model(task: str, device: str = "cpu") -> Path:
    """The task's source model folder, trained first if it is not in the cache."""
    folder = MODELS / task
    if not (folder / "models" / "model.safetensors").is_file():
        print(f"no cached {task} source model: training it ({DEFAULT_STEPS[task]} steps)", flush=True)
        train(task, DEFAULT_STEPS[task], device)
    return folder


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
