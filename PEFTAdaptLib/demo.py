"""`peftadapt demo`: adapt deepbet to a T2-like, bias-corrupted, noisy target domain, from installed files only, with
the product's default method (SEA-PEFT at its default budget), and show where its adapters went."""
from __future__ import annotations

import time
from pathlib import Path

from .data.io import read_image, write_image
from .data.transforms import to_array
from .demo_data import shifted_case
from .errors import PEFTAdaptError
from .models.registry import DEFAULT_MODEL, load_model
from .pipeline import evaluate, predict_file
from .plots import dice_curve, overlay_slices

SEEDS = {"support": 1, "audit": 2, "test": 3}
JOB_DIR = "job"


def write_demo_data(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Write the support, audit and test volumes (and reference masks) as NIfTI files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, seed in SEEDS.items():
        image, mask = shifted_case(seed)
        paths[role] = (write_image(image, folder / f"{role}_t2like.nii.gz"),
                       write_image(mask, folder / f"{role}_brainmask.nii.gz"))
    return paths


def demo_request(data: dict[str, tuple[Path, Path]], steps: int, seed: int):
    from .jobs import CaseSpec, JobSpec, TrainSpec
    from .methods import DEFAULT_METHOD, make_method

    case = lambda role, labelled=True: CaseSpec([str(data[role][0])], str(data[role][1]) if labelled else None)  # noqa: E731
    return JobSpec(model=DEFAULT_MODEL, support=[case("support")], audit=[case("audit")],
                   predict=[case("test", labelled=False)], method=make_method(DEFAULT_METHOD),
                   train=TrainSpec(steps=steps, audit_every=10, seed=seed, device="cpu"))


def run_demo(output_dir: str | Path, steps: int = 80, seed: int = 0, progress=None) -> dict:
    """Write the demo data, then adapt through the job client and the background worker (`<output>/job`)."""
    from .jobs import JobClient

    out = Path(output_dir).absolute()
    start = time.monotonic()
    data = write_demo_data(out / "data")
    reference = read_image(data["test"][1], what="label")
    _, zero_shot = predict_file(load_model(DEFAULT_MODEL), [data["test"][0]], out / "test_prediction_zeroshot.nii.gz")
    zero = evaluate(zero_shot, reference, [1])

    job = JobClient(out).submit(demo_request(data, steps, seed), out / JOB_DIR, overwrite=True)
    state = job.wait(on_events=progress)
    if state.outcome != "finished":
        raise PEFTAdaptError(f"demo adaptation did not finish: {state.message}")
    history = [(e["step"], e["dice"]) for e in job.events if e["event"] == "audit"]
    finished = next(e for e in job.events if e["event"] == "finished")
    [prediction_path] = job.prediction_paths()
    adapted = read_image(prediction_path, what="label")
    tuned = evaluate(adapted, reference, [1])
    method = state.method
    dice_curve(history, out / "dice_curve.png", f"deepbet + {method}: audit Dice")
    overlay_slices(
        to_array(read_image(data["test"][0])),
        {"zero-shot": to_array(zero_shot) == 1, "adapted": to_array(adapted) == 1},
        to_array(reference) == 1,
        out / "overlay.png",
    )
    return {
        "zero_shot": zero, "adapted": tuned, "trainable": state.trainable, "total": state.total, "method": method,
        "trainable_text": state.trainable_text,
        "allocation": state.allocation_summary, "result": state.message,
        "seconds": time.monotonic() - start, "train_seconds": finished["seconds"],
        "best_step": finished["best_step"], "output_dir": str(out), "prediction": str(prediction_path),
        "adapter": str(job.adapter_folder),
    }


def format_table(r: dict) -> str:
    rows = [
        ("", "Dice", "HD95 (mm)"),
        ("zero-shot deepbet", f"{r['zero_shot']['dice']:.4f}", f"{r['zero_shot']['hd95']:.2f}"),
        (f"adapted ({r['method']})", f"{r['adapted']['dice']:.4f}", f"{r['adapted']['hd95']:.2f}"),
    ]
    lines = [f"{a:<20}{b:>10}{c:>12}" for a, b, c in rows]
    gain = r["adapted"]["dice"] - r["zero_shot"]["dice"]
    lines += [
        f"Dice gain on the held-out test volume: {gain:+.4f}",
        f"trainable: {r['trainable_text']}",
        *(["allocation: " + r["allocation"].replace("\n", "\n" + " " * 12)] if r["allocation"] else []),
        f"result: {r['result']}",
        f"wall time: {r['seconds']:.0f} s (training {r['train_seconds']:.0f} s, best audit at step {r['best_step']})",
        f"outputs in {r['output_dir']}: {JOB_DIR}/predictions/{Path(r['prediction']).name}, {JOB_DIR}/adapter/, "
        "dice_curve.png, overlay.png, job/events.jsonl",
    ]
    return "\n".join(lines)
