"""SEA-PEFT against fixed-topology PEFT at one parameter budget, on three real shifts (see shifts.py):

    python bench/allocation.py --quick --update-docs            # the CPU setting of docs/benchmarks.md (~3 h)
    python bench/allocation.py --device cuda --seeds 3 --steps 200 --update-docs

Methods (same budget, 1 % of the model's parameters unless `--budget`): zero-shot, AdaBN, norm-affine, LoRA at
every rank of the sweep, ConvLoRA and SALT at the largest rank that fits the budget, SEA-PEFT at the budget and at
a quarter of it (the budget is a ceiling: with one support volume, fewer parameters can generalise better),
shallow fine-tuning (dense deltas on the layers nearest the input and the output by depth + norm-affine,
`PEFTAdaptLib/adapters/shallow.py`; a baseline the goal counts), full fine-tuning.
Every method trains through the engine's `Trainer` (same support patches, optimizer, steps and best-audited-state
selection); Dice and HD95 are measured on the held-out test cases on their own grids. Prints Markdown tables;
`--update-docs` also rewrites the `## Allocation (SEA-PEFT)` section of docs/benchmarks.md (the hand-written
findings live in the section before it, which it leaves alone). Raw results go to
bench/.cache/allocation-<shift>.json, and `--render` rebuilds the tables from them without training.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shifts import CACHE, SHIFTS, Shift  # noqa: E402

from PEFTAdaptLib import adapters as A  # noqa: E402
from PEFTAdaptLib.adapters.shallow import apply_shallow  # noqa: E402
from PEFTAdaptLib.pipeline import evaluate  # noqa: E402
from PEFTAdaptLib.inference import predict_case  # noqa: E402
from PEFTAdaptLib.seapeft import SeaPeftConfig, build_sea_peft  # noqa: E402
from PEFTAdaptLib.training import TrainConfig, Trainer  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Allocation (SEA-PEFT)"
RANKS = (1, 2, 4)
#: seeds per shift unless --seeds (≥ 3 everywhere; a deepbet run takes ~4 min on 2 cores, a spine run ~15 s)
SEEDS = {"brats": 3, "spine": 5, "spine-t2s": 5, "deepbet": 3}


# -- settings -----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    steps: int
    patches: int
    patch: tuple[int, int, int] | None  # None: the card's
    audit_every: int  # the trainer's whole-volume audits (best-state selection)
    lr: float = 3e-3  # PEFT methods and SEA-PEFT
    lr_norm: float = 1e-2  # norm-affine (the reference's Affine setting)
    lr_full: float = 5e-4  # full fine-tuning (dense deltas on every layer)


def settings(shift: str, quick: bool, steps: int | None) -> Settings:
    if quick:  # deepbet: the demo's own setting (at 40 steps × 64³ no method's audited state beat the source)
        base = {"brats": Settings(120, 2, (48, 48, 48), 40), "spine": Settings(120, 2, None, 40),
                "spine-t2s": Settings(120, 2, None, 40), "deepbet": Settings(80, 2, (128, 128, 128), 20)}[shift]
    else:
        base = {"brats": Settings(150, 2, None, 25), "spine": Settings(150, 2, None, 25),
                "spine-t2s": Settings(150, 2, None, 25), "deepbet": Settings(120, 2, (128, 128, 128), 20)}[shift]
    if steps:
        base = replace(base, steps=steps, audit_every=min(base.audit_every, steps) if not quick else steps)
    return base


class BenchTrainer(Trainer):
    """The engine's trainer; the step-0 audit (the untouched source network: every unit starts as an identity)
    is computed once per shift and reused instead of being recomputed for every method and seed."""

    zero_audit: float | None = None

    def _audit(self) -> float:
        if self.step == 0 and self.zero_audit is not None:
            self.history.append((0, self.zero_audit))
            if self.zero_audit > self.best_dice:
                self.best_dice, self.best_step, self.best_state = self.zero_audit, 0, self._unit_state()
            return self.zero_audit
        return super()._audit()


class PeakMemory:
    """Peak memory of a run: the CUDA allocator's peak on a GPU, else the growth of the resident set (sampled)."""

    def __init__(self, device: str):
        self.device, self.peak, self.base, self._stop = device, 0, 0, threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process = psutil.Process()
            self.base = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


# -- methods ------------------------------------------------------------------------------------------------------
def _largest_rank(shift: Shift, make, budget: int) -> tuple[int, int, bool]:
    """(rank, trainable, fits) of the largest rank in RANKS whose method fits the budget (else the smallest)."""
    best = None
    for rank in RANKS:
        network = shift.make_network()
        A.apply_adapter(network, make(rank), "probe")
        cost = A.count_trainable(network)
        if cost <= budget:
            best = (rank, cost, True)
        elif best is None:
            return rank, cost, False
    return best


def method_list(shift: Shift, budget: int, quick: bool) -> list[tuple[str, dict]]:
    """(label, spec) for every method of the table."""
    methods: list[tuple[str, dict]] = [("zero-shot", {"kind": "zero-shot"}), ("AdaBN", {"kind": "adabn"}),
                                       ("norm-affine", {"kind": "norm-affine"})]
    lora_costs = {}
    for rank in RANKS:
        network = shift.make_network()
        A.apply_adapter(network, A.LoRAConfig(r=rank, alpha=rank), "probe")
        lora_costs[rank] = A.count_trainable(network)
    ranks = [r for r in RANKS if lora_costs[r] <= budget]
    if not quick or not ranks:  # the full sweep shows what more parameters buy, over budget included
        ranks = list(RANKS)
    for rank in ranks:
        methods.append((f"LoRA r{rank}", {"kind": "lora", "rank": rank}))
    for label, kind, make in (("ConvLoRA", "convlora", lambda r: A.ConvLoRAConfig(r=r, alpha=r)),
                              ("SALT", "salt", lambda r: A.SALTConfig(ratio=0.1, lora_rank=r))):
        rank, _, _ = _largest_rank(shift, make, budget)
        methods.append((f"{label} r{rank}", {"kind": kind, "rank": rank}))
    methods += [("SEA-PEFT", {"kind": "sea-peft"}),
                ("SEA-PEFT, ¼ budget", {"kind": "sea-peft", "budget_share": 0.25})]
    methods.append(("shallow fine-tuning", {"kind": "shallow"}))
    methods.append(("full fine-tuning", {"kind": "full"}))
    return methods


def build(network: nn.Module, spec: dict, budget: int, settings_: Settings, seed: int,
          card=None) -> tuple[float, list]:
    """Put the method's units on `network`; returns (learning rate, hooks)."""
    kind, rank = spec["kind"], spec.get("rank", 0)
    if kind == "adabn":
        A.apply_adapter(network, A.AdaBNConfig(), "adabn")
    elif kind == "norm-affine":
        A.apply_adapter(network, A.NormAffineConfig(), "norm_affine")
        return settings_.lr_norm, []
    elif kind == "lora":
        A.apply_adapter(network, A.LoRAConfig(r=rank, alpha=rank), "lora")
    elif kind == "convlora":
        A.apply_adapter(network, A.ConvLoRAConfig(r=rank, alpha=rank), "convlora")
    elif kind == "salt":
        A.apply_adapter(network, A.SALTConfig(ratio=0.1, lora_rank=rank), "salt")
    elif kind == "full":  # W + ΔW with ΔW = 0 at start is exactly fine-tuning W (AdamW, no weight decay)
        A.apply_adapter(network, A.DenseConfig(), "full")
        return settings_.lr_full / A.DenseUnit.lr_scale, []
    elif kind == "shallow":  # the layers are found on a forward pass of a patch-sized input
        apply_shallow(network, torch.zeros(1, card.input_channels, *(settings_.patch or card.patch_size)))
    elif kind == "sea-peft":
        config = SeaPeftConfig.for_steps(int(budget * spec.get("budget_share", 1.0)), settings_.steps,
                                         train_patches=settings_.patches, lr=settings_.lr, seed=seed)
        return settings_.lr, [build_sea_peft(network, config)]
    return settings_.lr, []


def allocation_summary(hook) -> str:
    units = hook.allocation()
    counts = Counter((u["family"] + (f" r{u['rank']}" if u["family"] in ("lora", "convlora") else ""), u["site_kind"])
                     for u in units)
    return ", ".join(f"{family} ×{n} ({site})" for (family, site), n in sorted(counts.items(), key=lambda x: -x[1]))


def evaluate_cases(network: nn.Module, shift: Shift, device: str) -> list[dict]:
    scores = []
    for case in shift.test:
        _, label = predict_case(network, case, shift.card, device)
        scores.append(evaluate(label, case.label_image, [1]))
    return scores


def run_one(shift: Shift, label: str, spec: dict, seed: int, budget: int, s: Settings, device: str,
            zero_audit: float) -> dict:
    torch.manual_seed(seed)
    network = shift.make_network().to(device)
    lr, hooks = build(network, spec, budget, s, seed, shift.card)
    result = {"method": label, "seed": seed, **spec}
    if spec["kind"] == "adabn" and not any(True for _ in A.iter_units(network)):
        return {**result, "na": "no BatchNorm layer (instance norm re-normalises every input: nothing to re-estimate)"}
    card = replace(shift.card, patch_size=s.patch) if s.patch else shift.card
    with PeakMemory(device) as memory:
        start = time.monotonic()
        if spec["kind"] == "adabn":
            from PEFTAdaptLib.training import PatchSampler

            sampler = PatchSampler(shift.support, card.patch_size, s.patches, 0.5, seed)
            A.estimate_adabn(network, (sampler()[0].to(device) for _ in range(s.steps)))
        elif spec["kind"] != "zero-shot":
            config = TrainConfig(steps=s.steps, lr=lr, patches_per_step=s.patches, audit_every=s.audit_every,
                                 seed=seed, device=device)
            trainer = BenchTrainer(network, card, shift.support, shift.audit, config, None, hooks)
            trainer.zero_audit = zero_audit
            trainer.run()
            summary = trainer.finish()
            result.update(best_step=summary["best_step"], best_audit=summary["best_dice"])
        seconds = time.monotonic() - start
    network.eval()
    scores = evaluate_cases(network, shift, device)
    result.update(
        dice=float(np.mean([x["dice"] for x in scores])), hd95=float(np.mean([x["hd95"] for x in scores])),
        per_case=[x["dice"] for x in scores], trainable=A.count_trainable(network), seconds=seconds,
        memory_mb=memory.megabytes,
    )
    if hooks:
        hook = hooks[0]
        result.update(allocation=allocation_summary(hook), overhead_seconds=hook.overhead_seconds(),
                      phase_seconds=hook.seconds, final=hook.final and {k: hook.final[k] for k in ("chosen", "dice")},
                      units=[u["unit"] for u in hook.allocation()])
    return result


def run_shift(name: str, args) -> dict:
    from PEFTAdaptLib.training import audit_dice

    torch.manual_seed(0)
    shift = SHIFTS[name](args.device)
    s = settings(name, args.quick, args.steps)
    seeds = args.seeds or SEEDS[name]
    budget = int(args.budget * shift.total_parameters) if args.budget <= 1 else int(args.budget)
    zero_audit = audit_dice(shift.make_network().to(args.device), shift.audit, shift.card, args.device)
    out = {"shift": name, "title": shift.title, "total_parameters": shift.total_parameters, "budget": budget,
           "budget_fraction": args.budget, "settings": s.__dict__, "device": args.device, "quick": args.quick,
           "seeds": seeds, "runs": [], "torch": torch.__version__,
           "cases": {"support": [c.name for c in shift.support], "audit": [c.name for c in shift.audit],
                     "test": [c.name for c in shift.test]}}
    path = CACHE / f"allocation-{name}.json"
    if args.resume and path.is_file():  # keep the runs of an interrupted invocation with the same settings
        previous = json.loads(path.read_text())
        if all(previous.get(k) == json.loads(json.dumps(out[k])) for k in ("budget", "settings", "device", "quick")):
            out["runs"] = previous["runs"]
    done = {(r["method"], r["seed"]) for r in out["runs"]}
    CACHE.mkdir(parents=True, exist_ok=True)
    methods = method_list(shift, budget, args.quick)
    if args.kinds:  # a subset, in the given order (the table keeps whatever has run)
        methods = [m for kind in args.kinds for m in methods if m[1]["kind"] == kind]
    for label, spec in methods:
        for seed in [0] if spec["kind"] in ("zero-shot", "adabn") else range(seeds):
            if (label, seed) in done:
                continue
            run = run_one(shift, label, spec, seed, budget, s, args.device, zero_audit)
            out["runs"].append(run)
            path.write_text(json.dumps(out, indent=1))  # after every run: an interrupted benchmark loses one run
            print(json.dumps({k: v for k, v in run.items() if k not in ("phase_seconds", "units")}), flush=True)
    path.write_text(json.dumps(out, indent=1))
    return out


# -- tables -------------------------------------------------------------------------------------------------------
def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _standard_error(a: list[float], b: list[float]) -> float:
    """Standard error of the difference of two means (Welch); 0 where a side has one value."""
    if len(a) < 2 or len(b) < 2:
        return 0.0
    return (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


def summarise(result: dict) -> tuple[list[dict], dict]:
    """Per-method rows and the goal check of one shift."""
    total, budget = result["total_parameters"], result["budget"]
    rows, by_method = [], {}
    for run in result["runs"]:
        by_method.setdefault(run["method"], []).append(run)
    order = ("zero-shot", "adabn", "norm-affine", "lora", "convlora", "salt", "sea-peft", "shallow", "full")
    for method, runs in sorted(by_method.items(), key=lambda item: order.index(item[1][0]["kind"])):
        if "na" in runs[0]:
            rows.append({"method": method, "na": runs[0]["na"]})
            continue
        trainable = max(r["trainable"] for r in runs)
        row = {"method": method, "kind": runs[0]["kind"], "dice": [r["dice"] for r in runs],
               "hd95": [r["hd95"] for r in runs], "trainable": trainable, "fraction": trainable / total,
               "seconds": statistics.mean(r["seconds"] for r in runs),
               "memory": statistics.mean(r["memory_mb"] for r in runs), "within": trainable <= budget}
        if runs[0]["kind"] == "sea-peft":
            row["allocation"] = runs[0].get("allocation", "")
            row["overhead"] = statistics.mean(r["overhead_seconds"] / r["seconds"] for r in runs)
            row["trainable_per_seed"] = [r["trainable"] for r in runs]
        rows.append(row)
    fixed = [r for r in rows if "dice" in r and r["kind"] in ("norm-affine", "lora", "convlora", "salt", "shallow")]
    within = [r for r in fixed if r["within"]]
    best = max(within, key=lambda r: statistics.mean(r["dice"])) if within else None
    best_any = max(fixed, key=lambda r: statistics.mean(r["dice"])) if fixed else None
    goal = {}
    if best:
        goal = {"best_fixed": best["method"], "best_fixed_dice": statistics.mean(best["dice"]),
                "best_any": best_any["method"], "best_any_dice": statistics.mean(best_any["dice"]),
                "sea": {r["method"]: {"dice": statistics.mean(r["dice"]), "fraction": r["fraction"],
                                      "overhead": r["overhead"],
                                      "margin_points": 100 * (statistics.mean(r["dice"]) - statistics.mean(best["dice"])),
                                      "margin_se": 100 * _standard_error(r["dice"], best["dice"])}
                        for r in rows if r.get("kind") == "sea-peft"}}
    return rows, goal


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        s = result["settings"]
        rows, goal = summarise(result)
        lines += [f"### {result['title']}", "",
                  f"Budget {result['budget']:,} parameters = {100 * result['budget_fraction']:g} % of "
                  f"{result['total_parameters']:,}; {s['steps']} steps × {s['patches']} patch(es)"
                  f"{' of ' + '×'.join(map(str, s['patch'])) if s['patch'] else ''}, "
                  f"{result['seeds']} seeds; support {', '.join(result['cases']['support'])}, audit "
                  f"{', '.join(result['cases']['audit'])}, test {', '.join(result['cases']['test'])}.", "",
                  "| method | trainable | Dice (mean ± sd over seeds) | HD95 (mm) | wall (s) | peak mem (MB) |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            if "na" in row:
                lines.append(f"| {row['method']} | — | n/a: {row['na']} | | | |")
                continue
            flag = "" if row["within"] or row["kind"] == "full" else " (over budget)"
            name = f"**{row['method']}**" if row["kind"] == "sea-peft" else row["method"]
            lines.append(f"| {name} | {row['trainable']:,} ({100 * row['fraction']:.2f} %){flag} | {_fmt(row['dice'])} | "
                         f"{_fmt(row['hd95'], 1)} | {row['seconds']:.0f} | {row['memory']:.0f} |")
        lines.append("")
        for sea in (r for r in rows if r.get("kind") == "sea-peft"):
            lines.append(f"- {sea['method']} allocation (seed 0): {sea['allocation']}; allocator overhead "
                         f"{100 * sea['overhead']:.0f} % of the adaptation wall time.")
        if goal:
            margins = "; ".join(f"{name} − strongest baseline = **{g['margin_points']:+.1f} Dice points**"
                                + (f" (s.e. {g['margin_se']:.1f})" if g["margin_se"] else "")
                                for name, g in goal["sea"].items())
            lines.append(f"- Strongest baseline within the budget (fixed topologies and shallow fine-tuning): "
                         f"{goal['best_fixed']} ({goal['best_fixed_dice']:.3f}); {margins}.")
        lines.append("")
    return "\n".join(lines)


def update_docs(text: str, command: str) -> None:
    body = (f"{SECTION}\n\n`{command}` — produced by `bench/allocation.py` (raw results in "
            f"`bench/.cache/allocation-<shift>.json`).\n\n{text.rstrip()}\n")
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if SECTION in current:
        start = current.index(SECTION)
        following = current.find("\n## ", start + len(SECTION))
        end = len(current) if following < 0 else following + 1
        current = current[:start] + body + ("\n" + current[end:] if following >= 0 else "")
    else:
        current = current.rstrip() + "\n\n" + body
    DOCS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, help=f"seeds per method (default per shift: {SEEDS})")
    parser.add_argument("--steps", type=int, help="optimizer steps per adaptation (default: per shift and mode)")
    parser.add_argument("--quick", action="store_true", help="CPU-fast setting: short runs, small patches")
    parser.add_argument("--budget", type=float, default=0.01, help="fraction of the parameters (≤ 1) or a count")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--render", action="store_true", help="only rebuild the tables from bench/.cache")
    parser.add_argument("--kinds", nargs="+", help="only these method kinds, in this order (e.g. sea-peft lora full)")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in bench/.cache (same settings)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the SEA-PEFT section of docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the development machine has 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.render:
        results = [json.loads((CACHE / f"allocation-{name}.json").read_text()) for name in args.shifts]
    else:
        results = [run_shift(name, args) for name in args.shifts]
    text = markdown(results)
    print(text)
    if args.update_docs:
        flags = " ".join(a for a in sys.argv[1:] if a not in ("--render", "--update-docs", "--resume"))
        update_docs(text, f"python bench/allocation.py {flags} --update-docs".replace("  ", " "))


if __name__ == "__main__":
    main()
