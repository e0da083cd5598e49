"""Label-free adaptation benchmark: ConvLoRA self-training against an early segmentation head, through the product's
own path (the `label-free` method of the registry, the job client, the background worker):

    python bench/labelfree.py [--tasks spine brats] [--seeds 3] [--steps 60] [--device cpu] [--no-docs]

Shifts (real data, written as files by shifts.py):
- `spine`: spinal cord, site shift, same contrast. Source: the MONAI UNet trained on subject A's T2
  (`train_source.py`); target: the T2w of subject B from another site (`ivadomed/spine_unf01`, central 64 mm).
- `brats`: BraTS FLAIR → T1c, whole tumour. Source: the UNet trained on FLAIR; targets: T1c of patients 5 and 6.
Adaptation is transductive (the unlabelled target volumes are what the job adapts to, as in the paper); the ESH is
trained on labelled source volumes (the job's `source` cases). The targets' labels are given as audit cases, which a
label-free job scores for the user and never uses for training or selection.

Variants are the method's own settings: zero-shot; AdaBN only; norm-affine self-training (the instance-norm stand-in
for AdaBN); ConvLoRA self-training; ConvLoRA + AdaBN (AdaBN on BatchNorm, norm-affine on the adapted stages'
instance norms). Scores: Dice and surface Dice at 1 mm on the predictions' own grids, mean over targets; mean ± sd
over seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product import Settings, run  # noqa: E402
from report import mean_sd, replace_section  # noqa: E402
from shifts import Shift, brats_images, central, read_pair, write_case  # noqa: E402
from train_source import source_model  # noqa: E402

from PEFTAdaptLib.methods import make_method  # noqa: E402

SECTION = "Label-free adaptation"
VARIANTS = {  # name: the label-free method's settings (None: no adaptation)
    "zero-shot": None,
    "AdaBN only": {"convlora": False, "norm": "adabn"},
    "norm-affine self-training": {"convlora": False, "norm": "affine"},
    "ConvLoRA self-training": {"norm": "none"},
    "ConvLoRA + AdaBN (norm-affine on IN)": {},
}


def label_free_shift(task: str) -> Shift:
    """Targets as support, audit (evaluation only) and test; labelled source-like cases for the ESH."""
    if task == "spine":
        targets = [write_case("labelfree-spine", "B_t2", *central(*read_pair(
            "ivadomed/spine_unf01/sub-unf01_T2w.nii.gz", "ivadomed/spine_unf01/sub-unf01_T2w_seg-manual.nii.gz")))]
        source = [write_case("labelfree-spine", "A_t2", *read_pair("spine/t2/t2.nii.gz",
                                                                   "spine/t2/t2_seg-manual.nii.gz"))]
        model, classes = source_model("spine"), {1: "spinal cord"}
    else:
        targets = [write_case("labelfree-brats", f"pat{p}_T1c", *brats_images(p, "T1c")) for p in (5, 6)]
        source = [write_case("labelfree-brats", f"pat{p}_flair", *brats_images(p, "Flair")) for p in (3, 4)]
        model, classes = source_model("brats"), {1: "whole tumour"}
    return Shift(f"labelfree-{task}", task, str(model), targets, targets, targets, classes, extra={"source": source})


def surface_dice(prediction_path: str, reference_path: str, tolerance_mm: float = 1.0) -> float:
    import torch
    from monai.metrics import compute_surface_dice

    prediction, reference = sitk.ReadImage(prediction_path), sitk.ReadImage(reference_path)
    onehot = lambda image: torch.from_numpy(np.stack([sitk.GetArrayFromImage(image) == v for v in (0, 1)])[None]  # noqa: E731
                                            .astype(np.float32))
    value = compute_surface_dice(onehot(prediction), onehot(reference), [tolerance_mm],
                                 spacing=list(reversed(prediction.GetSpacing())))
    return float(torch.nan_to_num(value, nan=1.0).mean())


def run_task(task: str, seeds: int, settings: Settings) -> list[dict]:
    shift = label_free_shift(task)
    rows = []
    for variant, options in VARIANTS.items():
        method = None if options is None else make_method("label-free", **options)
        runs = []
        for seed in range(seeds if method else 1):
            result = run(shift, variant, method, settings, seed)
            result["surface"] = float(np.mean([surface_dice(str(Path(result["job"]) / "predictions" /
                                                                  f"{case.name}_seg.nii.gz"), case.label)
                                               for case in shift.test]))
            runs.append(result)
            print(f"{task} | {variant} | seed {seed} | Dice {result['dice']:.3f} | surface Dice {result['surface']:.3f}"
                  f" | trainable {result['trainable']} | best step {result['best_step']}", flush=True)
        rows.append({"task": task, "variant": variant, "runs": runs})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shift | variant | Dice | surface Dice (1 mm) | Δ Dice vs zero-shot | trainable | best step | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    zero = {r["task"]: r["runs"][0]["dice"] for r in rows if r["variant"] == "zero-shot"}
    for row in rows:
        runs = row["runs"]
        dices = [r["dice"] for r in runs]
        best = ", ".join(str(r["best_step"]) for r in runs) if runs[0]["trainable"] else "—"
        lines.append(f"| {row['task']} | {row['variant']} | {mean_sd(dices)} | {mean_sd([r['surface'] for r in runs])} "
                     f"| {np.mean(dices) - zero[row['task']]:+.3f} | {runs[0]['trainable']:,} | {best} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spine", "brats"], choices=["spine", "brats"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args()
    settings = Settings(args.steps, 2, None, max(args.steps // 6, 1), args.device)
    rows = [row for task in args.tasks for row in run_task(task, args.seeds, settings)]
    text = table(rows)
    print(text)
    if not args.no_docs:
        replace_section(SECTION, f"`python bench/labelfree.py {' '.join(sys.argv[1:])}` — through the job client "
                                 f"(the `label-free` method with the settings named in each row; job folders in "
                                 f"`bench/.cache/jobs/`). Transductive: the unlabelled target volumes are what each "
                                 f"job adapts to; their labels score the result only. See docs/labelfree.md.\n\n{text}")


if __name__ == "__main__":
    main()
