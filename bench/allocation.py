"""SEA-PEFT against fixed-topology PEFT at one parameter budget, on real shifts (shifts.py), through the product's
own path (the method registry, the job client and the background worker; bench/product.py):

    python bench/allocation.py --quick --update-docs            # the CPU setting of docs/benchmarks.md
    python bench/allocation.py --device cuda --seeds 3 --update-docs

Methods (the budget is 1 % of the model's parameters unless `--budget`): zero-shot (a predict job), norm-affine,
LoRA at ranks 1, 2, 4 (given), ConvLoRA and SALT at the largest rank that fits the budget, shallow fine-tuning
(first and last layers by graph depth + norm-affine), SEA-PEFT at the budget and at a quarter of it, full
fine-tuning. Every run uses the product's defaults (learning rates, audit, selection);
the settings below only size the runs. Test cases are predicted by the job and scored on their own grids. Results
go to bench/.cache/jobs/<shift>/<method>-seed<k>/ (the job folder and `bench-result.json`); a rerun reuses the
results whose request is unchanged. Prints Markdown tables; `--update-docs` rewrites the `## Allocation (SEA-PEFT)`
section of docs/benchmarks.md (the hand-written findings live in the section before it, which it leaves alone).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product import Settings, run, saved_result, with_warnings  # noqa: E402
from report import markdown, replace_section  # noqa: E402
from shifts import SHIFTS  # noqa: E402

from PEFTAdaptLib.methods import Budget, make_method  # noqa: E402

SECTION = "Allocation (SEA-PEFT)"
#: seeds per shift unless --seeds (≥ 3 everywhere; a deepbet run takes minutes on 2 cores, a spine run seconds)
SEEDS = {"spine-t1": 5, "spine-t2s": 5, "spine-site": 5}
QUICK = {  # CPU-fast sizes (deepbet: the demo's own setting)
    **dict.fromkeys(("brats-wt", "brats-wt-2", "brats-tc", "brats-tc-2"), Settings(120, 2, [48, 48, 48], 40)),
    **dict.fromkeys(("spine-t1", "spine-t2s", "spine-site"), Settings(120, 2, None, 40)),
    "meshnet-gw": Settings(60, 2, [64, 64, 64], 20), "deepbet": Settings(80, 2, [128, 128, 128], 20),
}
FULL = {
    **dict.fromkeys(("brats-wt", "brats-wt-2", "brats-tc", "brats-tc-2"), Settings(150, 2, None, 25)),
    **dict.fromkeys(("spine-t1", "spine-t2s", "spine-site"), Settings(150, 2, None, 25)),
    "meshnet-gw": Settings(120, 2, None, 20), "deepbet": Settings(120, 2, [128, 128, 128], 20),
}


def methods(budget: Budget) -> list[tuple[str, object]]:
    """(label, method config; None = zero-shot) for every row of the table."""
    quarter = Budget(fraction=budget.fraction / 4) if budget.fraction else Budget(count=max(1, budget.count // 4))
    return [("zero-shot", None), ("norm-affine", make_method("norm-affine")),
            *[(f"LoRA r{rank}", make_method("lora", rank=rank)) for rank in (1, 2, 4)],
            ("ConvLoRA", make_method("convlora", budget=budget)), ("SALT", make_method("salt", budget=budget)),
            ("shallow fine-tuning", make_method("shallow")),
            ("SEA-PEFT", make_method("sea-peft", budget=budget)),
            ("SEA-PEFT, ¼ budget", make_method("sea-peft", budget=quarter)),
            ("full fine-tuning", make_method("full"))]


def run_shift(name: str, args) -> dict:
    shift = SHIFTS[name]()
    settings = replace((QUICK if args.quick else FULL)[name])
    if args.steps:
        settings.steps = args.steps
    settings.device = args.device
    seeds = args.seeds or SEEDS.get(name, 3)
    budget = Budget.parse(args.budget)
    chosen = methods(budget)
    if args.methods:  # in the order given: the rows that matter most first
        chosen = sorted((m for m in chosen if m[0] in args.methods), key=lambda m: args.methods.index(m[0]))
    runs, not_run = [], {}
    for label, method in chosen:
        for seed in range(1 if method is None else seeds):
            if args.cached:
                if not (result := saved_result(shift, label, method, settings, seed)):
                    not_run.setdefault(label, []).append(seed)
                    continue
            else:
                result = run(shift, label, method, settings, seed, resume=not args.fresh)
            runs.append(with_warnings(result))
            print(json.dumps({k: v for k, v in result.items() if k in ("method", "seed", "dice", "trainable", "na",
                                                                      "train_seconds", "rank_reason")}), flush=True)
    zero = next((r for r in runs if r["method"] == "zero-shot"), None)
    total = next((r["total"] for r in runs if r.get("total")), None)
    return {"shift": name, "title": shift.title, "settings": settings.__dict__, "seeds": seeds, "runs": runs,
            "not_run": not_run, "total": total, "budget": total and budget.parameters(total),
            "budget_text": budget.describe().split(" of")[0],
            "cases": {"support": [c.name for c in shift.support], "audit": [c.name for c in shift.audit],
                      "test": [c.name for c in shift.test]}, "zero_shot": zero and zero["dice"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, help=f"seeds per method (default per shift: {SEEDS})")
    parser.add_argument("--steps", type=int, help="optimizer steps per adaptation (default: per shift and mode)")
    parser.add_argument("--quick", action="store_true", help="CPU-fast setting: short runs, small patches")
    parser.add_argument("--budget", default="1%", help="as the CLI takes it: 1%%, 0.01 or a parameter count")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--methods", nargs="+", help="only these rows, run in this order (labels as in the table)")
    parser.add_argument("--fresh", action="store_true", help="rerun even where a result for the same request exists")
    parser.add_argument("--cached", action="store_true", help="tables from the saved results only (runs not made yet "
                                                              "are listed below their table)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the SEA-PEFT section of docs/benchmarks.md")
    args = parser.parse_args()
    results = [run_shift(name, args) for name in args.shifts]
    text = "\n".join(markdown(result) for result in results)
    print(text)
    if args.update_docs:
        flags = shlex.join(a for a in sys.argv[1:] if a not in ("--update-docs", "--fresh", "--cached"))
        replace_section(SECTION, f"`python bench/allocation.py {flags} --update-docs` — produced by "
                                 f"`bench/allocation.py` through the job client (job folders and results in "
                                 f"`bench/.cache/jobs/`).\n\n{text}")


if __name__ == "__main__":
    main()
