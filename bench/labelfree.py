"""Label-free adaptation benchmark (issue #8): ConvLoRA self-training against an early segmentation head.

    python bench/labelfree.py [--tasks spine brats] [--seeds 3] [--steps 60] [--device cpu] [--no-docs]

Shifts (real data, built in memory):
- `spine`: spinal cord, site shift, same contrast. Source: the MONAI UNet trained on subject A's T2
  (`train_source.py`); target: the T2w of subject B from another site (`ivadomed/spine_unf01`, central 64 mm).
- `brats`: BraTS FLAIR → T1c, whole tumour. Source: the UNet trained on FLAIR; targets: T1c of patients 5 and 6.
Adaptation is transductive (the unlabelled test volumes are the target data, as in the paper); the ESH is trained on
the labelled source volumes (the paper's stage b). Target labels are used only to score the final state.

Variants: zero-shot; AdaBN only; norm-affine self-training (the instance-norm stand-in for AdaBN); ConvLoRA
self-training; ConvLoRA + AdaBN (AdaBN on BatchNorm, norm-affine on the adapted stages' instance norms). The
source UNets use instance norm, so "AdaBN only" has nothing to re-estimate and equals zero-shot (reported as such).
Scores: Dice and surface Dice at 1 mm (`monai.metrics.compute_surface_dice`) on the model grid, mean over test
volumes; mean ± std over seeds. Source models are cached in `bench/.cache/labelfree/` (separate from the other
benchmarks' cache, which their test runs overwrite).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_source  # noqa: E402
from shifts import CACHE, CARDS, _central, _read_pair, brats_case, spine_case, spine_source_cases  # noqa: E402

from PEFTAdaptLib.adapters.base import BATCH_NORM_TYPES  # noqa: E402
from PEFTAdaptLib.inference import predict_probabilities  # noqa: E402
from PEFTAdaptLib.labelfree import LabelFreeConfig, adapt_label_free  # noqa: E402
from PEFTAdaptLib.metrics import dice  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
RESULTS = CACHE / "labelfree"  # results-<task>.json: the docs table gathers every task run so far
SECTION = "## Label-free adaptation"
VARIANTS = {  # name: LabelFreeConfig overrides (None: no adaptation)
    "zero-shot": None,
    "AdaBN only": {"convlora": False, "norm": "adabn"},
    "norm-affine self-training": {"convlora": False, "norm": "affine"},
    "ConvLoRA self-training": {"convlora": True, "norm": "none"},
    "ConvLoRA + AdaBN (norm-affine on IN)": {"convlora": True, "norm": "auto"},
}


def shift(task: str):
    """(card, targets with evaluation labels, labelled source cases for the ESH, source network)."""
    train_source.CACHE = CACHE / "labelfree"
    network = train_source.load_source(task)
    if task == "spine":
        target = spine_case(*_central(*_read_pair("ivadomed/spine_unf01/sub-unf01_T2w.nii.gz",
                                                  "ivadomed/spine_unf01/sub-unf01_T2w_seg-manual.nii.gz")), "B_t2")
        return CARDS[task], [target], spine_source_cases(), network
    targets = [brats_case(p, "T1c") for p in (5, 6)]
    return CARDS[task], targets, [brats_case(p, "Flair") for p in (3, 4)], network


def scores(network, card, cases) -> tuple[float, float]:
    """Mean foreground Dice and surface Dice (1 mm) over `cases`."""
    from monai.metrics import compute_surface_dice

    dices, surface = [], []
    for case in cases:
        prediction = predict_probabilities(network, case.array, card).argmax(0)
        reference = case.label[0]
        dices.append(dice(prediction == 1, reference == 1))
        onehot = lambda a: torch.from_numpy(np.stack([a == 0, a == 1])[None].astype(np.float32))  # noqa: E731
        value = compute_surface_dice(onehot(prediction), onehot(reference), [1.0], spacing=list(card.spacing))
        surface.append(float(torch.nan_to_num(value, nan=1.0).mean()))
    return float(np.mean(dices)), float(np.mean(surface))


def run_task(task: str, seeds: int, steps: int, esh_steps: int, device: str) -> list[dict]:
    card, targets, source, pristine = shift(task)
    has_batch_norm = any(isinstance(m, BATCH_NORM_TYPES) for m in pristine.modules())
    rows = []
    for variant, overrides in VARIANTS.items():
        if overrides == {"convlora": False, "norm": "adabn"} and not has_batch_norm:
            print(f"{task} | {variant} | no BatchNorm: nothing to re-estimate, identical to zero-shot", flush=True)
            rows.append({"task": task, "variant": variant + " (no-op: instance norm)", "runs": rows[0]["runs"]})
            continue
        runs = []
        for seed in range(seeds if overrides else 1):
            network = copy.deepcopy(pristine)
            start, summary = time.monotonic(), {"trainable": 0, "best_step": 0, "best_agreement": float("nan")}
            if overrides:
                config = replace(LabelFreeConfig(steps=steps, esh_steps=esh_steps, eval_every=max(steps // 6, 1),
                                                 seed=seed, device=device), **overrides)
                summary = adapt_label_free(network, card, targets, config, source=source)
            d, sd = scores(network, card, targets)
            kept = {k: summary[k] for k in ("trainable", "best_step", "best_agreement")}
            runs.append({"dice": d, "surface": sd, **kept, "seconds": time.monotonic() - start})
            print(f"{task} | {variant} | seed {seed} | Dice {d:.3f} | surface Dice {sd:.3f} | trainable "
                  f"{summary['trainable']} | best step {summary['best_step']} | agreement "
                  f"{summary['best_agreement']:.3f}", flush=True)
        rows.append({"task": task, "variant": variant, "runs": runs})
    return rows


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| shift | variant | Dice | surface Dice (1 mm) | Δ Dice vs zero-shot | trainable | best step (agreement) "
             "| seeds |", "|---|---|---|---|---|---|---|---|"]
    zero = {r["task"]: r["runs"][0]["dice"] for r in rows if r["variant"] == "zero-shot"}
    for row in rows:
        runs = row["runs"]
        dices = [r["dice"] for r in runs]
        trained = runs[0]["trainable"] > 0
        best = ", ".join(f"{r['best_step']} ({r['best_agreement']:.2f})" for r in runs) if trained else "—"
        lines.append(f"| {row['task']} | {row['variant']} | {_mean_std(dices)} | "
                     f"{_mean_std([r['surface'] for r in runs])} | {np.mean(dices) - zero[row['task']]:+.3f} | "
                     f"{runs[0]['trainable']:,} | {best} | {len(runs)} |")
    return "\n".join(lines)


def save_results(task: str, rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = (f"--tasks {task} --seeds {args.seeds} --steps {args.steps} --esh-steps {args.esh_steps} "
                f"--device {args.device}")
    (RESULTS / f"results-{task}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


def saved_results() -> tuple[list[dict], list[str]]:
    rows, settings = [], []
    for task in ("spine", "brats"):
        path = RESULTS / f"results-{task}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            rows += saved["rows"]
            settings.append(f"`python bench/labelfree.py {saved['settings']}`")
    return rows, settings


def write_docs(markdown: str, settings: list[str]) -> None:
    intro = (f"{'; '.join(settings)} (OMP_NUM_THREADS=1, 2 shared CPU cores). Targets: spine = subject B's T2w "
             "(another site, same contrast as the source); brats = T1c of patients 5 and 6 (source: FLAIR). "
             "Adaptation is transductive on those unlabelled volumes; their labels only score the final state "
             "(model grid, mean over volumes). ESH on the second encoder stage, trained on the labelled source "
             "volumes; ConvLoRA (paper factorisation, r = 2) on the first two encoder stages; selection by "
             "ESH/decoder agreement on 4 held target patches. The source UNets use instance norm: *AdaBN only* has "
             "nothing to re-estimate and equals zero-shot; *norm-affine* is its trainable stand-in. Best step "
             "(agreement) per seed. See docs/labelfree.md.")
    body = f"{SECTION}\n\n{textwrap.fill(intro, 116, break_on_hyphens=False)}\n\n{markdown}\n"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["spine", "brats"], choices=["spine", "brats"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--esh-steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    for task in args.tasks:
        rows = run_task(task, args.seeds, args.steps, args.esh_steps, args.device)
        print(table(rows))
        save_results(task, rows, args)
    if not args.no_docs:
        rows, settings = saved_results()
        write_docs(table(rows), settings)


if __name__ == "__main__":
    main()
