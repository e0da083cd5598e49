"""Background adaptation worker: `python -m PEFTAdaptLib.worker JOBDIR [--resume] [--device cpu]`.

Reads `JOBDIR/job.json`, validates every input before training, trains with checkpoints, writes the adapter and
predictions, and reports through `events.jsonl` / `status.json` (docs/worker.md). Exit codes: 0 finished,
2 invalid input, 3 failed, 4 cancelled, 5 job folder locked by another worker.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import count_trainable, load_adapters, save_adapters
from .data.cases import Case, load_case
from .data.io import SUPPORTED_SUFFIXES, read_image, write_image
from .errors import InputError, ModelError, PEFTAdaptError
from .inference import predict_case
from .jobs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .jobs.events import EventLog
from .jobs.lock import JobLock, JobLocked
from .jobs.spec import CaseSpec, JobSpec, inside_job, load_job, resolve_input
from .methods import METHODS, MethodConfig, build_method, rank_for_budget
from .models.foundation import FoundationModel
from .models.registry import load_model
from .training import TrainConfig, Trainer

EXIT_FINISHED, EXIT_INVALID, EXIT_FAILED, EXIT_CANCELLED, EXIT_LOCKED = 0, 2, 3, 4, 5
CANCEL_FILE = "cancel"
TRACEBACK_FILE = "traceback.txt"
ADAPTER_DIR = "adapter"
PREDICTIONS_DIR = "predictions"


def select_device(requested: str) -> str:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but no CUDA GPU is usable here; use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class CancelWatch:
    """Cancel requests: SIGTERM/SIGINT or a `cancel` file in the job folder, checked between steps."""

    def __init__(self, job_dir: Path):
        self.file = job_dir / CANCEL_FILE
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or self.file.exists()


def _load_cases(job_dir: Path, specs: list[CaseSpec], model: FoundationModel, role: str, labelled: bool) -> list[Case]:
    cases = []
    for spec in specs:
        if labelled and not spec.label:
            raise InputError(f"{role} case {spec.images}: a label file is required")
        images = [resolve_input(job_dir, p) for p in spec.images]
        label = resolve_input(job_dir, spec.label) if spec.label else None
        cases.append(load_case(images, model.card, label, model.locate))
    return cases


def _output_name(spec: CaseSpec) -> str:
    first = Path(spec.images[0]).name
    suffix = next((s for s in SUPPORTED_SUFFIXES if first.lower().endswith(s)), ".nii.gz")
    return first[: -len(suffix)] + "_seg" + suffix


def _check_writable(job_dir: Path) -> None:
    probe = job_dir / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{job_dir}: output folder is not writable ({exc.strerror})") from None


def _method_config(spec: JobSpec, model: FoundationModel) -> tuple[MethodConfig, int | None]:
    """The method and its parameter budget (a count); fixed LoRA with a budget takes the largest rank that fits."""
    method = MethodConfig(spec.method.name, rank=spec.method.rank)
    if method.name not in METHODS:
        raise InputError(f"unknown method '{method.name}'; choose one of {', '.join(METHODS)}")
    budget = spec.method.budget
    if budget is None:
        return method, (int(0.01 * model.num_parameters()) if method.name == "sea-peft" else None)
    total = model.num_parameters()
    count = budget * total if budget <= 1 else budget
    if budget <= 0 or count > total:
        raise InputError(f"budget {budget} must be > 0 and at most the model's {total:,} parameters (or a fraction ≤ 1)")
    if method.name in ("lora", "convlora", "salt"):
        method.rank = rank_for_budget(model.network, method, int(count))
    return method, int(count)


def run_job(job_dir: str | Path, resume: bool = False, device: str | None = None,
            emit_extra: Callable[[dict], None] | None = None, echo: bool = True) -> int:
    """Run one job to its end; returns the exit code. `emit_extra` also receives every event (CLI progress)."""
    job_dir = Path(job_dir).resolve()
    if not job_dir.is_dir():
        print(f"peftadapt worker: {job_dir}: job folder not found", file=sys.stderr)
        return EXIT_INVALID
    try:
        lock = JobLock(job_dir).__enter__()
    except JobLocked as exc:
        print(f"peftadapt worker: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    log = EventLog(job_dir, echo=echo)

    def emit(event: dict) -> None:
        log(event)
        if emit_extra is not None:
            emit_extra(event)

    running: dict[str, Trainer] = {}
    try:
        return _run(job_dir, resume, device, emit, running)
    except PEFTAdaptError as exc:
        emit({"event": "failed", "message": str(exc), "exit_code": EXIT_INVALID})
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 - any crash must end as a `failed` event with the traceback on disk
        (job_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
            message = ("out of memory: use a smaller patch size, fewer patches per step, or the CPU "
                       f"(--device cpu) — {message}")
        trainer = running.get("trainer")
        if trainer is not None and trainer.step > 0:
            _safe_checkpoint(job_dir, trainer, emit)
        emit({"event": "failed", "message": message, "traceback": TRACEBACK_FILE, "exit_code": EXIT_FAILED})
        return EXIT_FAILED
    finally:
        log.close()
        lock.__exit__(None, None, None)


def _safe_checkpoint(job_dir: Path, trainer: Trainer, emit) -> None:
    try:
        folder = save_checkpoint(job_dir, trainer, trainer.base_fingerprint, trainer.metadata)
        emit({"event": "checkpoint", "step": trainer.step, "path": str(folder.relative_to(job_dir))})
    except Exception:  # noqa: BLE001 - the previous checkpoint stays in place
        pass


def _run(job_dir: Path, resume: bool, device_override: str | None, emit, running: dict) -> int:
    spec = load_job(job_dir)
    _check_writable(job_dir)
    device = select_device(device_override or spec.train.device)
    model = load_model(spec.model)
    if isinstance(model.network, torch.jit.ScriptModule):
        raise ModelError(f"{model.files.get('network', spec.model)}: a TorchScript model predicts (`peftadapt predict`) "
                         "and takes weight-space adapters through the Python API (models.torchscript_card.with_adapter), "
                         "but adaptation jobs need an eager network: give its MONAI bundle or nnU-Net folder instead")
    if spec.method.name == "label-free":  # no labelled support: its own loop (PEFTAdaptLib/labelfree/job.py)
        from .labelfree.job import run_label_free

        return run_label_free(job_dir, spec, model, device, emit, CancelWatch(job_dir), resume)
    # validate every input before any training or output
    support = _load_cases(job_dir, spec.support, model, "support", labelled=True)
    audit = _load_cases(job_dir, spec.audit, model, "audit", labelled=True)
    if not support:
        raise InputError("job has no support (training) case")
    if not audit:
        raise InputError("job has no audit case: one labelled volume must be held out to measure Dice")
    predict_inputs = [[resolve_input(job_dir, p) for p in c.images] for c in spec.predict]
    for images in predict_inputs:
        for path in images:
            read_image(path)
    method, budget = _method_config(spec, model)
    warm = resolve_input(job_dir, spec.warm_start) if spec.warm_start else None
    torch.manual_seed(spec.train.seed)  # adapter initialisation is part of the seeded run
    hooks = []
    if warm is not None:
        load_adapters(model.network, warm, model.base_fingerprint)
    else:
        _, hooks = build_method(model.network, method, budget, spec.train.lr, spec.train.seed,
                                spec.train.steps)
    card = model.card
    if spec.train.patch_size:
        from dataclasses import replace

        card = replace(card, patch_size=tuple(spec.train.patch_size))
    config = TrainConfig(steps=spec.train.steps, lr=spec.train.lr, patches_per_step=spec.train.patches_per_step,
                         audit_every=spec.train.audit_every, seed=spec.train.seed, device=device)
    trainer = Trainer(model.network, card, support, audit, config, emit, hooks)
    trainer.base_fingerprint = model.base_fingerprint
    trainer.metadata = {"model": model.card.id, "method": method.name, "rank": method.rank, "seed": config.seed}
    running["trainer"] = trainer
    checkpoint = latest_checkpoint(job_dir) if resume else None
    if resume and checkpoint is None:
        emit({"event": "warning", "message": "no checkpoint to resume from; starting from the beginning"})
    if checkpoint is not None:
        load_checkpoint(checkpoint, trainer, model.base_fingerprint)
    emit({"event": "started", "model": model.card.id, "method": method.name, "rank": method.rank,
          "device": device, "steps": config.steps, "resumed_from_step": trainer.step,
          "trainable": count_trainable(model.network), "total": model.num_parameters(), "budget": budget,
          "warm_start": str(warm) if warm else None})

    def checkpoint_now(t: Trainer) -> None:
        folder = save_checkpoint(job_dir, t, model.base_fingerprint, trainer.metadata)
        emit({"event": "checkpoint", "step": t.step, "path": str(folder.relative_to(job_dir))})

    cancel = CancelWatch(job_dir)
    completed = trainer.run(cancel, checkpoint_now, spec.train.checkpoint_every)
    if not completed:
        checkpoint_now(trainer)
        emit({"event": "cancelled", "reason": "cancel requested", "step": trainer.step, "exit_code": EXIT_CANCELLED})
        return EXIT_CANCELLED
    checkpoint_now(trainer)
    summary = trainer.finish()
    adapter = save_adapters(model.network, inside_job(job_dir, ADAPTER_DIR), model.base_fingerprint,
                            {**trainer.metadata, "best_audit_dice": summary["best_dice"],
                             "best_step": summary["best_step"], "steps": config.steps})
    final_dice = trainer.context.audit_dice()
    emit({"event": "validation", "step": config.steps, "dice": final_dice, "adapter": ADAPTER_DIR})
    for case_spec, images in zip(spec.predict, predict_inputs):
        case = load_case(images, model.card, locate=model.locate)
        _, label = predict_case(model.network, case, model.card, device)
        path = write_image(label, inside_job(job_dir, f"{PREDICTIONS_DIR}/{_output_name(case_spec)}"))
        emit({"event": "prediction", "input": str(images[0]), "path": str(path.relative_to(job_dir))})
    emit({"event": "finished", "adapter": str(adapter.relative_to(job_dir)), "best_dice": summary["best_dice"],
          "best_step": summary["best_step"], "seconds": summary["seconds"], "exit_code": EXIT_FINISHED})
    return EXIT_FINISHED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m PEFTAdaptLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", help="job folder holding job.json")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override the job's device")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    return run_job(args.job_dir, resume=args.resume, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
