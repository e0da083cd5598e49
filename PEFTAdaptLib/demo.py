"""`peftadapt demo`: adapt deepbet to a T2-like, bias-corrupted, noisy target domain, from installed files only."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data.io import read_image, write_image
from .data.transforms import to_array
from .demo_data import shifted_case
from .errors import PEFTAdaptError
from .models.registry import DEFAULT_MODEL, load_model
from .pipeline import evaluate, predict_file
from .plots import dice_curve, overlay_slices

SEEDS = {"support": 1, "audit": 2, "test": 3}


def write_demo_data(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Write the support, audit and test volumes (and reference masks) as NIfTI files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, seed in SEEDS.items():
        image, mask = shifted_case(seed)
        paths[role] = (write_image(image, folder / f"{role}_t2like.nii.gz"),
                       write_image(mask, folder / f"{role}_brainmask.nii.gz"))
    return paths


def run_demo(output_dir: str | Path, steps: int = 80, rank: int = 4, seed: int = 0, progress=None) -> dict:
    """Run the whole demo through the background worker's path (the output folder is the job folder)."""
    from .jobs import CaseSpec, JobSpec, MethodSpec, TrainSpec, write_job
    from .jobs.events import STATUS_FILE
    from .worker import EXIT_FINISHED, run_job

    torch.manual_seed(seed)
    out = Path(output_dir).resolve()
    start = time.monotonic()
    data = write_demo_data(out / "data")
    relative = {role: [str(p.relative_to(out)) for p in paths] for role, paths in data.items()}
    reference = read_image(data["test"][1], what="label")
    _, zero_shot = predict_file(load_model(DEFAULT_MODEL), [data["test"][0]], out / "test_prediction_zeroshot.nii.gz")
    zero = evaluate(zero_shot, reference, [1])

    write_job(out, JobSpec(
        model=DEFAULT_MODEL,
        support=[CaseSpec([relative["support"][0]], relative["support"][1])],
        audit=[CaseSpec([relative["audit"][0]], relative["audit"][1])],
        method=MethodSpec("lora", rank=rank),
        train=TrainSpec(steps=steps, lr=2e-3, audit_every=10, checkpoint_every=20, seed=seed, device="cpu"),
        predict=[CaseSpec([relative["test"][0]])],
    ))
    code = run_job(out, emit_extra=progress, echo=False)
    status = json.loads((out / STATUS_FILE).read_text())
    if code != EXIT_FINISHED:
        raise PEFTAdaptError(f"demo adaptation did not finish: {status.get('message', code)}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["event"] == "started")
    finished = next(e for e in events if e["event"] == "finished")
    history = [(e["step"], e["dice"]) for e in events if e["event"] == "audit"]
    prediction_path = out / next(e for e in events if e["event"] == "prediction")["path"]
    adapted = read_image(prediction_path, what="label")
    tuned = evaluate(adapted, reference, [1])
    dice_curve(history, out / "dice_curve.png", "deepbet + LoRA: audit Dice")
    overlay_slices(
        to_array(read_image(data["test"][0])),
        {"zero-shot": to_array(zero_shot) == 1, "adapted": to_array(adapted) == 1},
        to_array(reference) == 1,
        out / "overlay.png",
    )
    return {
        "zero_shot": zero, "adapted": tuned, "trainable": started["trainable"], "total": started["total"],
        "seconds": time.monotonic() - start, "train_seconds": finished["seconds"],
        "best_step": finished["best_step"], "output_dir": str(out), "prediction": str(prediction_path),
        "adapter": str(out / finished["adapter"]),
    }


def format_table(r: dict) -> str:
    rows = [
        ("", "Dice", "HD95 (mm)"),
        ("zero-shot deepbet", f"{r['zero_shot']['dice']:.4f}", f"{r['zero_shot']['hd95']:.2f}"),
        ("adapted (LoRA)", f"{r['adapted']['dice']:.4f}", f"{r['adapted']['hd95']:.2f}"),
    ]
    lines = [f"{a:<20}{b:>10}{c:>12}" for a, b, c in rows]
    gain = r["adapted"]["dice"] - r["zero_shot"]["dice"]
    lines += [
        f"Dice gain on the held-out test volume: {gain:+.4f}",
        f"trainable parameters: {r['trainable']:,} of {r['total']:,} ({100 * r['trainable'] / r['total']:.2f} %)",
        f"wall time: {r['seconds']:.0f} s (training {r['train_seconds']:.0f} s, best audit at step {r['best_step']})",
        f"outputs in {r['output_dir']}: predictions/test_t2like_seg.nii.gz, adapter/, dice_curve.png, overlay.png,"
        " events.jsonl",
    ]
    return "\n".join(lines)
