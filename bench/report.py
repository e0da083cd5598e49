"""Benchmark tables from run results (bench/product.py): Markdown for docs/benchmarks.md, one table per shift,
and the sections of docs/benchmarks.md that a script owns, replaced in place."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
#: fixed topologies, counted as baselines where they fit the budget; shallow fine-tuning counts whatever it costs
BASELINE_KINDS = ("norm-affine", "lora", "convlora", "salt", "svd", "bitfit")
#: issue 18's bound: no adapted test case below zero-shot by more than this (Dice, 0–1)
WORSE_BY = 0.01


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):  # a surface distance to an empty prediction
        return f"{mean_sd(finite, digits)} (∞ in {len(values) - len(finite)} of {len(values)}: nothing predicted)"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def standard_error(a: list[float], b: list[float]) -> float:
    """Standard error of the difference of two means (Welch); 0 where a side has one value."""
    if len(a) < 2 or len(b) < 2:
        return 0.0
    return (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


def rows(result: dict) -> list[dict]:
    """One row per method: Dice over seeds, the worst change of any test case against zero-shot, cost, time."""
    by_method: dict[str, list[dict]] = {}
    for run in result["runs"]:
        by_method.setdefault(run["method"], []).append(run)
    zero = next((r for r in result["runs"] if r["method"] == "zero-shot"), None)
    zero_cases = {c["case"]: c["dice"] for c in zero["cases"]} if zero else {}
    table = []
    for method, runs in by_method.items():
        if any("na" in r for r in runs):
            table.append({"method": method, "na": next(r["na"] for r in runs if "na" in r)})
            continue
        changes = [(c["dice"] - zero_cases[c["case"]], r["seed"], c) for r in runs for c in r["cases"]
                   if c["case"] in zero_cases]
        worst = min((change for change, _, _ in changes), default=0.0)
        losses = [(change, seed, c) for change, seed, c in changes if change < -WORSE_BY]
        below = [f"{100 * change:+.1f} on {c['case']} (seed {seed}, {'warned' if c.get('warned') else 'not warned'})"
                 for change, seed, c in losses]
        kind = (runs[0]["request"].get("method") or {}).get("name", "zero-shot")
        table.append({
            "method": method, "kind": kind, "dice": [r["dice"] for r in runs], "hd95": [r["hd95"] for r in runs],
            "predicted": len(changes), "named": sum(bool(c.get("warned")) for _, _, c in changes),
            "named_losses": sum(bool(c.get("warned")) for _, _, c in losses),
            "worst_case_change": worst, "below": below, "trainable": max(r["trainable"] for r in runs),
            "fraction": max(r["trainable"] for r in runs) / result["total"],
            "seconds": statistics.mean(r["train_seconds"] for r in runs),
            "memory": statistics.mean(r["memory_mb"] for r in runs),
            "within": max(r["trainable"] for r in runs) <= result["budget"],
            "rank_reason": runs[0].get("rank_reason", ""), "allocation": runs[0].get("allocation"),
            "seed": runs[0]["seed"],
        })
    return table


def margins(table: list[dict]) -> dict:
    """SEA-PEFT's margin (Dice points, with its standard error) over the strongest baseline: every fixed topology
    within the budget, and shallow fine-tuning."""
    baselines = [r for r in table if "dice" in r and ((r["kind"] in BASELINE_KINDS and r["within"])
                                                      or r["kind"] == "shallow")]
    if not baselines:
        return {}
    best = max(baselines, key=lambda r: statistics.mean(r["dice"]))
    return {"best": best["method"], "best_dice": statistics.mean(best["dice"]),
            "sea": {r["method"]: (100 * (statistics.mean(r["dice"]) - statistics.mean(best["dice"])),
                                  100 * standard_error(r["dice"], best["dice"]))
                    for r in table if r.get("kind") == "sea-peft"}}


def markdown(result: dict) -> str:
    if not result["runs"]:
        return f"### {result['title']}\n\nNot run yet (`--shifts {result['shift']}`).\n"
    s = result["settings"]
    lines = [f"### {result['title']}", "",
             f"Budget {result['budget']:,} parameters = {result['budget_text']} of {result['total']:,}; "
             f"{s['steps']} steps × {s['patches_per_step']} patch(es)"
             f"{' of ' + '×'.join(map(str, s['patch'])) if s['patch'] else ''}, audit every {s['audit_every']}; "
             f"{result['seeds']} seeds; support {', '.join(result['cases']['support'])}, audit "
             f"{', '.join(result['cases']['audit']) or 'a held-out slab of the support (the product default)'}, "
             f"test {', '.join(result['cases']['test'])}.", "",
             "| method | trainable | test Dice (mean ± sd over seeds) | worst test case vs zero-shot | HD95 (mm) | "
             "training (s) | peak memory (MB) | seeds |", "|---|---|---|---|---|---|---|---|"]
    table = rows(result)
    for row in table:
        if "na" in row:
            lines.append(f"| {row['method']} | — | n/a: {row['na']} | | | | | |")
            continue
        over = "" if row["within"] or row["kind"] in ("full", "zero-shot") else " (over budget)"
        name = f"**{row['method']}**" if row["kind"] == "sea-peft" else row["method"]
        lines.append(f"| {name} | {row['trainable']:,} ({100 * row['fraction']:.2f} %){over} | {mean_sd(row['dice'])} | "
                     f"{100 * row['worst_case_change']:+.1f} points | {mean_sd(row['hd95'], 1)} | {row['seconds']:.0f} | "
                     f"{row['memory']:.0f} | {len(row['dice'])} |")
    lines.append("")
    if result.get("not_run"):
        missing = (f"{label} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"
                   for label, seeds in result["not_run"].items())
        lines.append(f"- Not run yet: {', '.join(missing)}.")
    lines += harm(table)
    goal = margins(table)
    if goal:
        text = "; ".join(f"{name} − {goal['best']} = **{m:+.1f} Dice points** (s.e. {se:.1f})"
                         for name, (m, se) in goal["sea"].items())
        lines.append(f"- Strongest baseline (fixed topologies within the budget, shallow fine-tuning): {goal['best']} "
                     f"({goal['best_dice']:.3f}){'; ' + text if text else ''}.")
    for row in table:
        if row.get("kind") == "sea-peft" and row.get("allocation"):
            units = row["allocation"].get("units", [])
            lines.append(f"- {row['method']} (seed {row['seed']}) ends on {len(units)} units, "
                         f"{row['allocation'].get('budget_used', 0):,} of {row['allocation'].get('budget', 0):,} "
                         "budget parameters.")
    lines.append("")
    return "\n".join(lines)


def harm(table: list[dict]) -> list[str]:
    """The lines under a table (`rows`) that say whether adaptation made a test case worse, and whether the job named
    it for checking."""
    below = [f"{row['method']} {', '.join(row['below'])}" for row in table if row.get("below")]
    lines = [f"- Test cases more than {100 * WORSE_BY:.0f} point below zero-shot (and whether the job warned the user "
             f"to check that volume): {'; '.join(below) if below else 'none'}."]
    adapted = [row for row in table if row.get("kind", "zero-shot") != "zero-shot"]
    if adapted:
        named, predicted = sum(r["named"] for r in adapted), sum(r["predicted"] for r in adapted)
        lines.append(f"- Test predictions the jobs named for checking: {named} of {predicted}; of the "
                     f"{sum(len(r['below']) for r in adapted)} more than {100 * WORSE_BY:.0f} point below zero-shot, "
                     f"{sum(r['named_losses'] for r in adapted)} were named.")
    return lines


def replace_section(title: str, body: str) -> None:
    """Rewrite the `## title` section of docs/benchmarks.md (up to the next `## `), or append it."""
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.rstrip()}\n"
    start = current.find(f"## {title}\n")
    if start < 0:
        DOCS.write_text(current.rstrip() + "\n\n" + section)
        return
    following = current.find("\n## ", start + 1)
    end = len(current) if following < 0 else following + 1
    DOCS.write_text(current[:start] + section + ("\n" + current[end:] if following >= 0 else ""))
