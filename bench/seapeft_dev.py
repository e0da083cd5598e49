"""SEA-PEFT development runs on the spinal-cord shifts (the numbers behind docs/seapeft.md's choices):

    python bench/seapeft_dev.py --shift spine --methods shallow convlora sea-peft --seeds 3
    python bench/seapeft_dev.py --shift spine-t2s ...                  # the check shift: run once, never tuned on

Every run trains through the engine's `Trainer` at the benchmark's quick setting (bench/allocation.py) and is
measured twice: at its **final** state (the allocator's final sweep, before the trainer's selection) and at the
**selected** state (the trainer's best audited state, what `adapt` returns) — whole-volume Dice on the audit case
(what a choice may look at) and on each test case (reported, never used for a choice). SEA-PEFT variants are
`sea-peft:<field>=<value>,...` (SeaPeftConfig overrides). Rows go to bench/.cache/seapeft-dev-<shift>.jsonl,
with the allocation events of each SEA-PEFT run (`--events`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocation import build, evaluate_cases, settings  # noqa: E402
from shifts import CACHE, SHIFTS  # noqa: E402

from PEFTAdaptLib import adapters as A  # noqa: E402
from PEFTAdaptLib.adapters.shallow import ShallowConfig, apply_shallow  # noqa: E402
from PEFTAdaptLib.seapeft import SeaPeftConfig, build_sea_peft  # noqa: E402
from PEFTAdaptLib.training import TrainConfig, audit_dice, supervised_trainer  # noqa: E402

FIXED = {"norm-affine": {"kind": "norm-affine"}, "lora": {"kind": "lora", "rank": 1},
         "convlora": {"kind": "convlora", "rank": 1}, "salt": {"kind": "salt", "rank": 4}}


def parse_method(text: str) -> tuple[str, dict]:
    """`sea-peft:budget_share=0.25,audit_patches=4` → ("sea-peft", {...}); values parsed as JSON where possible."""
    kind, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return kind, options


def build_dev(network, kind: str, options: dict, budget: int, s, seed: int, card):
    """(learning rate, hooks) for one method of the development runs."""
    if kind == "shallow":
        extra = options.pop("plus", None)  # a fixed method on the other layers too (exploration)
        example = torch.zeros(1, card.input_channels, *card.patch_size)
        records = apply_shallow(network, example, ShallowConfig(**options))
        if extra:
            dense = sorted({r.layer for r in records if r.unit.kind == "dense"})
            config = {"lora": A.LoRAConfig(r=1, alpha=1, exclude_modules=dense),
                      "convlora": A.ConvLoRAConfig(r=1, alpha=1, exclude_modules=dense),
                      "salt": A.SALTConfig(ratio=0.1, lora_rank=4, exclude_modules=dense),
                      "bitfit": A.BitFitConfig(exclude_modules=dense)}[extra]
            A.apply_adapter(network, config, extra)
        return s.lr, []
    if kind == "sea-peft":
        options = dict(options)
        share = options.pop("budget_share", 1.0)
        config = SeaPeftConfig.for_steps(int(budget * share), s.steps, train_patches=s.patches, lr=s.lr, seed=seed,
                                         **options)
        return s.lr, [build_sea_peft(network, config)]
    return build(network, FIXED[kind], budget, s, seed)


def measure(network, shift, device) -> dict:
    network.eval()
    test = [x["dice"] for x in evaluate_cases(network, shift, device)]
    return {"audit": audit_dice(network, shift.audit, shift.card, device), "test": float(np.mean(test)),
            "per_case": test, "trainable": A.count_trainable(network)}


def run(shift, method: str, seed: int, budget: int, s, device: str, keep_events: bool) -> dict:
    kind, options = parse_method(method)
    torch.manual_seed(seed)
    network = shift.make_network().to(device)
    lr, hooks = build_dev(network, kind, options, budget, s, seed, shift.card)
    events: list[dict] = []
    config = TrainConfig(steps=s.steps, lr=lr, patches_per_step=s.patches, audit_every=s.audit_every, seed=seed,
                         device=device)
    trainer = supervised_trainer(network, shift.card, shift.support, shift.audit, config, events.append, hooks)
    start = time.monotonic()
    trainer.run()
    seconds = time.monotonic() - start
    final = measure(network, shift, device)
    before_sweep = None
    if hooks and hooks[0].final:  # the allocation at the last step, before SEA-PEFT's own final sweep
        hook = hooks[0]
        hook._sync_gates(hook.final["previous_units"])
        before_sweep = measure(network, shift, device)
        hook._sync_gates()
    trainer.restore_best()
    summary = trainer.summary()
    selected = measure(network, shift, device)
    row = {"shift": shift.name, "method": method, "seed": seed, "final": final, "selected": selected,
           "before_sweep": before_sweep,
           "best_step": summary["best_step"], "seconds": seconds,
           "audits": [(step, dice) for step, dice in summary["history"]]}
    if hooks:
        hook = hooks[0]
        row.update(overhead=hook.overhead_seconds() / seconds, phases=dict(hook.seconds),
                   units=[u["unit"] for u in hook.allocation()],
                   final_sweep=hook.final and {k: hook.final[k] for k in ("chosen", "dice")})
        if keep_events:
            row["events"] = [e for e in events if e["event"] in ("unit_audit", "allocation", "final_selection")]
    return row


def table(rows: list[dict]) -> str:
    """Mean ± sd over seeds of audit and test Dice, final and selected state."""
    def fmt(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else \
            f"{values[0]:.3f}"

    lines = ["| method | seeds | trainable | audit: before sweep | final | selected | test: before sweep | final | "
             "selected | overhead |", "|---|---|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        overhead = f"{100 * statistics.mean(r['overhead'] for r in runs):.0f} %" if "overhead" in runs[0] else ""
        cells = [fmt([r[state][metric] for r in runs]) if all(r.get(state) for r in runs) else "—"
                 for metric in ("audit", "test") for state in ("before_sweep", "final", "selected")]
        lines.append(f"| {method} | {len(runs)} | {max(r['final']['trainable'] for r in runs):,} | "
                     + " | ".join(cells) + f" | {overhead} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shift", default="spine", choices=[n for n in SHIFTS if n.startswith("spine")])
    parser.add_argument("--methods", nargs="+", default=["shallow", "convlora", "sea-peft"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.01, help="fraction of the parameters")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--events", action="store_true", help="keep SEA-PEFT's allocation events in the rows")
    parser.add_argument("--render", action="store_true", help="only print the table of the rows already run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="label of this code version (rows are grouped by method and tag)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = CACHE / f"seapeft-dev-{args.shift}.jsonl"
    if not args.render:
        shift = SHIFTS[args.shift](args.device)
        s = settings("spine", quick=True, steps=None)
        budget = int(args.budget * shift.total_parameters)
        CACHE.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                row = {**run(shift, method, seed, budget, s, args.device, args.events), "tag": args.tag}
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k not in ("events", "audits")}), flush=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [{**r, "method": r["method"] + (f" [{r['tag']}]" if r.get("tag") else "")} for r in rows
            if args.render or (r["method"] in args.methods and r.get("tag", "") == args.tag)]
    print(table(rows))


if __name__ == "__main__":
    main()
