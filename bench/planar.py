"""The 2D / ViT benchmark (issue 20): MED-PEFT's setting — LoRA on the query and value projections of a ViT
segmentation model — against SEA-PEFT at the same parameter budget and full fine-tuning, on real 2D images.

Shift `brats-2d`: BraTS 2013 whole tumour, axial slices. Source: a small 2D UNETR (ViT encoder, fused qkv) trained on
FLAIR slices of the four shared patients (`train_source.py --task brats-2d`); target: their T1c slices, as 2D image
files. Support = patient 3's middle tumour slice (one annotated 2D image), audit = patient 4's; test = three slices
each of patients 5 and 6 (middle, ±6 mm). Every method runs through the product path (`product.py`: job client,
worker, prediction files scored on their own grids), with the same steps, patches and seeds.

    python bench/planar.py [--seeds 3] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product import Settings, run, with_warnings  # noqa: E402
from report import harm, mean_sd, rows  # noqa: E402
from shifts import Shift, brats_images, write_case  # noqa: E402

from PEFTAdaptLib.methods import Budget, make_method  # noqa: E402

TEST_SLICES = (-6, 0, 6)  # mm from the middle of the tumour


def slices(patient: int, contrast: str, offsets) -> dict[int, tuple[sitk.Image, sitk.Image]]:
    """Axial slices (2D images, brain only, whole-tumour label) at `offsets` mm from the tumour's middle slice."""
    image, label = brats_images(patient, contrast)
    tumour = sitk.GetArrayViewFromImage(label).any(axis=(1, 2))
    middle = int(np.median(np.nonzero(tumour)[0]))
    return {middle + z: (image[:, :, middle + z], label[:, :, middle + z]) for z in offsets}


def shift() -> Shift:
    from train_source import source_model

    def cases(patient, offsets):
        return [write_case("brats-2d", f"pat{patient}_T1c_z{z}", *pair)
                for z, pair in slices(patient, "T1c", offsets).items()]

    return Shift("brats-2d", "BraTS FLAIR → T1c, whole tumour, axial 2D slices, UNETR (ViT) source",
                 str(source_model("brats-2d")), cases(3, (0,)), cases(4, (0,)),
                 cases(5, TEST_SLICES) + cases(6, TEST_SLICES), {1: "whole tumour"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=4, help="LoRA q/v rank; SEA-PEFT's budget is its cost")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = shift()
    settings = Settings(steps=args.steps, patches_per_step=4, patch=None, audit_every=max(1, args.steps // 4))
    lora = run(target, f"LoRA q/v r{args.rank}", make_method("lora-qv", rank=args.rank), settings, 0, not args.fresh)
    budget = lora["trainable"]
    methods = [(f"LoRA q/v r{args.rank}", make_method("lora-qv", rank=args.rank)),
               (f"SEA-PEFT ({budget:,} parameters)", make_method("sea-peft", budget=Budget.parse(str(budget)))),
               ("full fine-tuning", make_method("full"))]
    results = [run(target, "zero-shot", None, settings, 0, not args.fresh)]
    results += [run(target, label, method, settings, seed, not args.fresh)
                for label, method in methods for seed in range(args.seeds)]
    print(f"\n{target.title}; {args.steps} steps × 4 patches of 64², seeds 0..{args.seeds - 1}; total "
          f"{lora['total']:,} parameters\n")
    print("| method | test Dice (mean ± sd over seeds) | worst test case vs zero-shot | HD95 mm | trainable | "
          "train s |")
    print("|---|---|---|---|---|---|")
    table = rows({"runs": [with_warnings(r) for r in results], "total": lora["total"], "budget": budget})
    for row in table:
        if "na" in row:
            print(f"| {row['method']} | n/a: {row['na']} | | | | |")
            continue
        print(f"| {row['method']} | {mean_sd(row['dice'])} | {100 * row['worst_case_change']:+.1f} points | "
              f"{mean_sd(row['hd95'], 1)} | {row['trainable']:,} | {row['seconds']:.0f} |")
    print("\n" + "\n".join(harm(table)))
    (Path(__file__).resolve().parent / ".cache" / "planar.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
