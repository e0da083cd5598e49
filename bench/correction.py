"""A simulated clinician correcting slices, through the product's own path (job client, background worker):

    OMP_NUM_THREADS=1 python bench/correction.py --update-docs

Start from the zero-shot prediction of a target volume that has a reference label (the shift's first support
volume). Each round the clinician "corrects" k more axial slices — the prediction is replaced by the reference on
them, and they are marked annotated — and the model re-adapts from the previous round's adapter with all corrected
slices so far as sparse supervision (no audit volume: the job holds out corrected slices, docs/sparse.md). After
each round the shift's test volumes (never used for any choice) are scored. Slices are chosen by

- `ranked`: the product's own ranking (`<name>_slices.json` of the round's prediction of the target: picks
  alternate between uncertainty near the predicted structure, neighbours deferred, and coverage of the slices that
  hold image; the corrected slices count as picks),
- `random`: uniformly among the slices not corrected yet (the seed draws them),
- `even`: evenly spaced (each new slice farthest from the corrected ones and the volume's ends),

with k = 1, 3, 5 per round (seeds per k and rounds per shift: `PLANS`, sized to what a CPU run affords). The
reference is one adaptation on the target's whole label, as many steps as the rounds together.
Reported: the corrected slices each strategy needs to reach 90 % of the full-annotation Dice on the test volumes
(issue 19's measure), and 90 % of the *gain* from zero-shot to full annotation — the two agree when zero-shot
scores 0; the second still says something when zero-shot is already above 90 % of the reference, and nothing (n/a)
when full annotation does not beat zero-shot.
Results: bench/.cache/jobs/correction/<shift>/…; a rerun reuses finished jobs whose request is unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product import JOBS, Settings, here, portable, score, warned  # noqa: E402
from report import WORSE_BY, replace_section  # noqa: E402
from shifts import SHIFTS, Shift  # noqa: E402

from PEFTAdaptLib.data.sparse import index_axis  # noqa: E402
from PEFTAdaptLib.data.transforms import from_array, to_array  # noqa: E402
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec  # noqa: E402
from PEFTAdaptLib.methods import DEFAULT_METHOD, make_method  # noqa: E402
from PEFTAdaptLib.uncertainty import companion_paths, ranked  # noqa: E402

SECTION = "Correcting slices (sparse re-adaptation)"
STRATEGIES = ("ranked", "random", "even")
TARGET_SHARE = 0.9  # of the full-annotation Dice, and of the gain from zero-shot to it
ROOT = JOBS / "correction"


@dataclass(frozen=True)
class Plan:
    settings: Settings  # each round's training (the full-annotation reference: as many steps as all rounds)
    limit: int  # corrected slices at most
    rounds: int
    seeds: dict[int, int]  # slices per round (k) → seeds run


#: per shift: seeds per k sized to what a CPU run affords (a deepbet round costs minutes, a spine round seconds)
PLANS = {"spine-t1": Plan(Settings(30, 2, None, 30), 10, 5, {1: 5, 3: 5, 5: 5}),
         "deepbet": Plan(Settings(30, 2, [128, 128, 128], 30), 10, 3, {1: 1, 3: 5, 5: 1}),
         "brats-wt": Plan(Settings(30, 2, [48, 48, 48], 30), 10, 3, {1: 1, 3: 1, 5: 1})}


@dataclass
class Target:
    shift: Shift
    image: str
    reference: np.ndarray  # (x, y, z) label values on the target's grid
    grid: sitk.Image
    axis: int  # the index axis of axial slices


def submit(folder: Path, spec: JobSpec):
    """Run one job (or reuse it when finished with the same request); returns (events, prediction paths), or None
    when the job refuses the corrections and asks for more (none of them, or too few to hold some out for its audit,
    holds the structure)."""
    saved = folder / "bench-request.json"
    result = folder / "bench-events.json"
    if result.is_file() and portable(json.loads(saved.read_text())) == portable(spec.to_dict()):
        data = json.loads(result.read_text())
        return data["events"], [here(p) for p in data["predictions"]]
    job = JobClient(folder.parent).submit(spec, folder, overwrite=True)
    state = job.wait()
    if state.needs == "annotation":
        return None  # the job asks for more corrected slices through the structure
    if state.outcome != "finished":
        raise RuntimeError(f"{folder}: {state.outcome}: {state.message}")
    saved.write_text(json.dumps(spec.to_dict()))
    paths = [str(p) for p in job.prediction_paths()]
    result.write_text(json.dumps({"events": job.events, "predictions": paths}))
    return job.events, [Path(p) for p in paths]


def test_scores(target: Target, predictions: list[Path], events: list[dict] = ()) -> dict:
    """Dice of each of the shift's test volumes (predictions after the target's), their mean, and the volumes the
    job's warnings named."""
    cases = {c["case"]: c["dice"] for c in score(target.shift, predictions[1:])}
    return {"dice": float(np.mean(list(cases.values()))), "cases": cases,
            "warned": [case for case in cases if warned(events, case)]}


def choose(strategy: str, k: int, done: list[int], depth: int, ranking: list[int], rng) -> list[int]:
    """The next k slices to correct (never one corrected already)."""
    free = [i for i in range(depth) if i not in done]
    if strategy == "random":
        return sorted(int(i) for i in rng.choice(free, size=min(k, len(free)), replace=False))
    picked = [i for i in ranking if i not in done][:k] if strategy == "ranked" else []
    while len(picked) < min(k, len(free)):  # evenly spaced (also fills a ranking that ran out)
        taken = done + picked
        picked.append(max((i for i in free if i not in picked),
                          key=lambda i: min([abs(i - t) for t in taken] + [i + 1, depth - i])))
    return picked


def corrected_files(target: Target, slices: list[int], prediction: Path, folder: Path) -> CaseSpec:
    """The clinician's work: the current prediction with the reference on the corrected slices, and their mask."""
    label = to_array(sitk.ReadImage(str(prediction)), np.uint8)
    mask = np.zeros(label.shape, np.uint8)
    np.moveaxis(mask, target.axis, 0)[slices] = 1
    label = np.where(mask > 0, target.reference, label).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(from_array(label, target.grid), str(folder / "corrected.nii.gz"))
    sitk.WriteImage(from_array(mask, target.grid), str(folder / "annotated.nii.gz"))
    return CaseSpec([target.image], str(folder / "corrected.nii.gz"), "target", str(folder / "annotated.nii.gz"))


def ranking_of(prediction: Path, done: list[int]) -> list[int]:
    """The product's ranking of the round's prediction, with the corrected slices counted as its own picks."""
    plane = json.loads(companion_paths(prediction)["slices"].read_text())["planes"]["axial"]
    scores = np.zeros(max(e["index"] for e in plane["slices"]) + 1)
    for entry in plane["slices"]:
        scores[entry["index"]] = entry["score"]
    return [index for index, _ in ranked(scores, done, tuple(plane["extent"]))]


def run_curve(target: Target, strategy: str, k: int, seed: int, settings: Settings, limit: int, rounds: int,
              zero: tuple, method) -> list[dict]:
    """Up to `rounds` rounds of k corrected slices (at most `limit` in all): Dice on the test volumes after each."""
    rng = np.random.default_rng(1000 * seed + k)
    depth = target.grid.GetSize()[target.axis]
    done: list[int] = []
    adapter, (scores, predictions) = None, zero
    points = [{"slices": 0, **scores}]
    while len(points) <= rounds and len(done) + k <= min(limit, depth):
        ranking = ranking_of(predictions[0], done) if strategy == "ranked" else []
        done += choose(strategy, k, done, depth, ranking, rng)
        folder = ROOT / target.shift.name / f"{strategy}-k{k}-seed{seed}" / f"round{len(points)}"
        spec = JobSpec(model=target.shift.model, method=method, train=settings.train(seed),
                       support=[corrected_files(target, sorted(done), predictions[0], folder.with_name(
                           folder.name + "-input"))],
                       predict=[CaseSpec([target.image], name="target")]
                       + [CaseSpec([c.image], name=c.name) for c in target.shift.test],
                       warm_start=adapter)
        submitted = submit(folder, spec)
        if submitted is None:  # the clinician corrects more slices before the next try
            points.append({**points[-1], "slices": len(done), "kept": "refused", "chosen": sorted(done)})
            continue
        events, predictions = submitted
        finished = next(e for e in events if e["event"] == "finished")
        adapter = str(folder / "adapter")
        points.append({"slices": len(done), **test_scores(target, predictions, events), "kept": finished.get("kept"),
                       "chosen": sorted(done)})
        print(json.dumps({"shift": target.shift.name, "strategy": strategy, "k": k, "seed": seed, **points[-1]}),
              flush=True)
    return points


def needed(points: list[dict], goal: float) -> int | None:
    """The fewest corrected slices whose Dice reaches `goal` (None: not within the rounds run)."""
    return next((p["slices"] for p in points if p["dice"] >= goal), None)


def run_shift(name: str, args) -> dict:
    plan = PLANS[name]
    settings = replace(plan.settings, steps=args.steps or plan.settings.steps)
    rounds = args.rounds or plan.rounds
    seeds = {k: args.seeds or plan.seeds.get(k, 1) for k in args.k or plan.seeds}
    shift = SHIFTS[name]()
    target_files = shift.support[0]
    grid = sitk.ReadImage(target_files.image)
    target = Target(shift, target_files.image, to_array(sitk.ReadImage(target_files.label), np.uint8), grid,
                    index_axis(grid, "axial"))
    method = make_method(args.method)
    predict = [CaseSpec([target.image], name="target")] + [CaseSpec([c.image], name=c.name) for c in shift.test]
    _, zero_predictions = submit(ROOT / name / "zero-shot", JobSpec(model=shift.model, task="predict", predict=predict,
                                                                   train=TrainSpec(device="cpu")))
    zero = (test_scores(target, zero_predictions), zero_predictions)
    full = []
    reference = replace(settings, steps=rounds * settings.steps)  # as many steps as the longest curve
    for seed in range(max(seeds.values())):
        events, predictions = submit(ROOT / name / f"full-seed{seed}", JobSpec(
            model=shift.model, method=method, train=reference.train(seed), predict=predict,
            support=[CaseSpec([target.image], target_files.label, "target")]))
        full.append(test_scores(target, predictions, events))
    curves = {f"{strategy} k{k} seed{seed}": run_curve(target, strategy, k, seed, settings, plan.limit, rounds, zero,
                                                       method)
              for k in seeds for strategy in args.strategies for seed in range(seeds[k])}
    structure = np.moveaxis(target.reference, target.axis, 0).reshape(grid.GetSize()[target.axis], -1).any(axis=1)
    return {"shift": name, "title": shift.title, "settings": settings.__dict__, "limit": plan.limit, "rounds": rounds,
            "depth": len(structure), "structure": np.flatnonzero(structure).tolist(), "zero": zero[0]["dice"],
            "zero_cases": zero[0]["cases"], "full": [f["dice"] for f in full], "full_cases": [f["cases"] for f in full],
            "full_warned": [f["warned"] for f in full],
            "curves": curves, "method": args.method, "seeds": seeds, "strategies": args.strategies}


def goals(result: dict) -> tuple[float, float | None]:
    """90 % of the full-annotation Dice; 90 % of the gain from zero-shot to it (None: full annotation gains nothing)."""
    zero, full = result["zero"], float(np.mean(result["full"]))
    return TARGET_SHARE * full, (zero + TARGET_SHARE * (full - zero) if full > zero else None)


def slices_needed(curves: list[list[dict]], goal: float | None) -> str:
    if goal is None:
        return "n/a"
    counts = [needed(c, goal) for c in curves]
    return ", ".join(str(n) if n is not None else f">{c[-1]['slices']}" for n, c in zip(counts, curves))


def curves_of(result: dict, strategy: str, k: int) -> list[list[dict]]:
    """One curve per seed run for this strategy and k."""
    return [result["curves"][f"{strategy} k{k} seed{s}"] for s in range(result["seeds"][k])]


def below_zero_shot(result: dict) -> list[str]:
    """Every test case an adapted model (a round, or the full-annotation reference) scored more than `WORSE_BY` below
    zero-shot, and whether its job's warnings named that volume."""
    zero = result["zero_cases"]
    scored = [(f"full annotation seed {seed}", cases, named)
              for seed, (cases, named) in enumerate(zip(result["full_cases"], result["full_warned"]))]
    scored += [(f"{name} after {point['slices']} slices", point["cases"], point["warned"])
               for name, curve in result["curves"].items() for point in curve[1:]]
    return [f"{run}: {case} {100 * (dice - zero[case]):+.1f} ({'warned' if case in named else 'not warned'})"
            for run, cases, named in scored for case, dice in cases.items() if dice < zero[case] - WORSE_BY]


def last_round_gaps(result: dict, k: int) -> str:
    """Ranked minus each other strategy after the last round, paired by seed (same seed, same training noise)."""
    ranked_last = [c[-1]["dice"] for c in curves_of(result, "ranked", k)]
    gaps = []
    for other in (s for s in result["strategies"] if s != "ranked"):
        gap = 100 * (np.array(ranked_last) - [c[-1]["dice"] for c in curves_of(result, other, k)])
        gaps.append(f"ranked − {other} {gap.mean():+.1f} points (s.e. {gap.std(ddof=1) / np.sqrt(len(gap)):.1f})")
    return f"k = {k}: " + ", ".join(gaps)


def table(result: dict) -> str:
    of_full, of_gain = goals(result)
    settings, structure = result["settings"], set(result["structure"])
    lines = [f"### {result['title']}", "",
             f"{result['method']}, {settings['steps']} steps × {settings['patches_per_step']} patches per round"
             f"{' of ' + '×'.join(map(str, settings['patch'])) if settings['patch'] else ''}; target "
             f"{result['depth']} axial slices ({len(structure)} hold the structure), at most {result['rounds']} rounds "
             f"and {result['limit']} corrected slices; full annotation: {result['rounds'] * settings['steps']} steps on "
             f"the whole label. Zero-shot Dice {result['zero']:.3f}; full-annotation Dice {np.mean(result['full']):.3f} "
             f"(seeds: {', '.join(f'{d:.3f}' for d in result['full'])}); 90 % of it {of_full:.3f}; 90 % of the gain "
             + (f"{of_gain:.3f}." if of_gain is not None else "n/a (full annotation does not beat zero-shot)."), "",
             "| strategy | k per round | slices to 90 % of full annotation (per seed) | slices to 90 % of the gain "
             "(per seed) | Dice after each round (mean over seeds) | seed 0's slices after the last round (on the "
             "structure) |",
             "|---|---|---|---|---|---|"]
    for k in result["seeds"]:
        for strategy in result["strategies"]:
            curves = curves_of(result, strategy, k)
            rounds = " → ".join(f"{np.mean([c[i]['dice'] for c in curves]):.3f}" for i in range(len(curves[0])))
            chosen = curves[0][-1].get("chosen", [])
            lines.append(f"| {strategy} | {k} | {slices_needed(curves, of_full)} | {slices_needed(curves, of_gain)} | "
                         f"{rounds} | {', '.join(map(str, chosen))} ({sum(i in structure for i in chosen)}) |")
    paired = [last_round_gaps(result, k) for k, n in result["seeds"].items()
              if n > 1 and "ranked" in result["strategies"] and len(result["strategies"]) > 1]
    if paired:
        lines += ["", "Test Dice after the last round, paired by seed (mean over seeds): " + "; ".join(paired) + "."]
    below = below_zero_shot(result)
    zero = ", ".join(f"{case} {dice:.3f}" for case, dice in result["zero_cases"].items())
    lines += ["", f"Test cases more than {100 * WORSE_BY:.0f} point below zero-shot (zero-shot: {zero}), in Dice "
                  f"points, and whether the job warned the user to check that volume: "
                  f"{'; '.join(below) if below else 'none'}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    colours = {"ranked": "tab:red", "random": "tab:gray", "even": "tab:blue"}
    styles = {1: ":", 3: "--", 5: "-"}
    for axis, result in zip(axes[0], results):
        for k in result["seeds"]:
            for strategy in result["strategies"]:
                curves = curves_of(result, strategy, k)
                x = [p["slices"] for p in curves[0]]
                y = np.mean([[p["dice"] for p in c] for c in curves], axis=0)
                axis.plot(x, y, styles.get(k, "-"), color=colours[strategy], label=f"{strategy}, k={k}")
        axis.axhline(np.mean(result["full"]), color="black", lw=0.8, label="full annotation")
        axis.axhline(result["zero"], color="black", lw=0.8, ls="--", label="zero-shot")
        axis.axhline(goals(result)[0], color="black", lw=0.8, ls=":", label="90 % of full annotation")
        axis.set(title=result["title"], xlabel="corrected slices", ylabel="test Dice")
    axes[0][0].legend(fontsize=7)  # the first shift runs every k
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--k", nargs="+", type=int, help="slices corrected per round (default: the shift's plan)")
    parser.add_argument("--seeds", type=int, help="seeds per k (default: the shift's plan)")
    parser.add_argument("--rounds", type=int, help="correction rounds at most (default: the shift's plan)")
    parser.add_argument("--steps", type=int, help="steps per round (default: per shift)")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--update-docs", action="store_true", help="rewrite the section of docs/benchmarks.md and "
                                                                   "docs/correction.png")
    args = parser.parse_args()
    results = [run_shift(name, args) for name in args.shifts]
    (ROOT / "results.json").write_text(json.dumps(results))
    text = "\n".join(table(result) for result in results)
    print(text)
    if args.update_docs:
        plot(results, Path(__file__).resolve().parents[1] / "docs" / "correction.png")
        command = " ".join(["OMP_NUM_THREADS=1 python bench/correction.py",
                            *(a for a in sys.argv[1:] if a != "--update-docs"), "--update-docs"])
        replace_section(SECTION, f"`{command}` — through the job client; plot: `docs/correction.png`.\n\n" + text)


if __name__ == "__main__":
    main()
