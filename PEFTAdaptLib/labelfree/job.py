"""The worker's `label-free` job: target volumes without labels (`support`, labels ignored), optional labelled
source-like volumes for the ESH (`source`), optional reference labels for evaluation only (`audit`).

Events: `started`, `esh`, `step`, `agreement` (step, agreement[, dice]) in place of Dice audits, `validation`,
`prediction`, `finished`. The adapter is written each time agreement improves, so a cancelled or killed job keeps its best adapter so far
(`adapter/`, metadata `final: false`); `--resume` restarts the self-training from the beginning.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..adapters import save_adapters
from ..data.cases import load_case
from ..data.io import read_image, write_image
from ..errors import InputError
from ..inference import predict_case
from ..jobs.spec import CaseSpec, JobSpec, inside_job, resolve_input
from ..models.foundation import FoundationModel
from ..worker import (
    ADAPTER_DIR, EXIT_CANCELLED, EXIT_FINISHED, PREDICTIONS_DIR, _load_cases, _output_name,
)
from .selftrain import LabelFreeAdaptation, LabelFreeConfig

LABEL_FREE = "label-free"
#: ESH training steps: the run's steps, at most this many (the head is small; it converges quickly)
MAX_ESH_STEPS = 60


def _validate(job_dir: Path, spec: JobSpec, model: FoundationModel, emit) -> tuple[list, list, list, list]:
    if spec.warm_start:
        raise InputError("label-free starts from the source model; it cannot warm-start from an adapter")
    if spec.method.budget is not None:
        raise InputError("label-free takes a ConvLoRA rank, not a parameter budget")
    if not spec.support:
        raise InputError("label-free job has no target volume (support)")
    if any(case.label for case in spec.support):
        emit({"event": "warning", "message": "label-free ignores the labels of target volumes; give them as audit "
                                             "cases to evaluate (never used for training or selection)"})
    targets = _load_cases(job_dir, [CaseSpec(c.images) for c in spec.support], model, "target", labelled=False)
    source = _load_cases(job_dir, spec.source, model, "source", labelled=True)
    reference = _load_cases(job_dir, spec.audit, model, "audit", labelled=True)
    predict_inputs = [[resolve_input(job_dir, p) for p in c.images] for c in spec.predict]
    for images in predict_inputs:
        for path in images:
            read_image(path)
    return targets, source, reference, predict_inputs


def run_label_free(job_dir: Path, spec: JobSpec, model: FoundationModel, device: str, emit,
                   should_stop: Callable[[], bool], resume: bool = False) -> int:
    """Run a label-free job to its end; returns the worker exit code."""
    targets, source, reference, predict_inputs = _validate(job_dir, spec, model, emit)
    if resume:
        emit({"event": "warning", "message": "label-free jobs keep their best adapter, not an optimizer checkpoint: "
                                                 "self-training starts from the beginning"})
    card = replace(model.card, patch_size=tuple(spec.train.patch_size)) if spec.train.patch_size else model.card
    train = spec.train
    config = LabelFreeConfig(steps=train.steps, lr=train.lr, rank=spec.method.rank,
                             patches_per_step=train.patches_per_step, eval_every=train.audit_every, esh_steps=min(MAX_ESH_STEPS, train.steps), seed=train.seed,
                             device=device)
    adapter_dir = inside_job(job_dir, ADAPTER_DIR)
    metadata = {"model": model.card.id, "method": LABEL_FREE, "rank": config.rank, "seed": config.seed,
                "factorisation": config.factorisation, "steps": config.steps}
    holder: list[LabelFreeAdaptation] = []

    def emit_and_keep_best(event: dict) -> None:
        """Write the adapter each time agreement improves (the network is in that state right now): a cancelled or
        killed job keeps its best adapter so far."""
        if event["event"] == "agreement" and holder and holder[0].best_step == event["step"]:
            save_adapters(model.network, adapter_dir, model.base_fingerprint,
                          {**metadata, "best_step": event["step"], "best_agreement": event["agreement"], "final": False})
            event = {**event, "adapter": ADAPTER_DIR}
        emit(event)

    adaptation = LabelFreeAdaptation(model.network, card, targets, config, source, reference, emit_and_keep_best)
    holder.append(adaptation)
    emit({"event": "started", "model": model.card.id, "method": LABEL_FREE, "rank": config.rank, "device": device,
          "steps": config.steps, "resumed_from_step": 0, "trainable": adaptation.trainable,
          "total": model.num_parameters(), "budget": None, "warm_start": None, "esh_stage": adaptation.stage,
          "adapted_stages": adaptation.adapted_stages, "esh_source": adaptation.esh_source})
    adaptation.train_head()
    if not adaptation.run(should_stop):
        emit({"event": "cancelled", "reason": "cancel requested", "step": adaptation.step, "exit_code": EXIT_CANCELLED,
              "adapter": ADAPTER_DIR if adapter_dir.is_dir() else None, "best_step": adaptation.best_step})
        return EXIT_CANCELLED
    summary = adaptation.finish()
    metadata.update(esh_stage=summary["stage"], adapted_stages=summary["adapted_stages"],
                    esh_source=summary["esh_source"], best_agreement=summary["best_agreement"],
                    best_step=summary["best_step"], final=True)
    adapter = save_adapters(model.network, adapter_dir, model.base_fingerprint, metadata)
    validation = {"event": "validation", "step": config.steps, "agreement": summary["best_agreement"],
                  "adapter": ADAPTER_DIR}
    if reference:  # evaluation only
        validation["dice"] = adaptation.reference_dice()
    emit(validation)
    for case_spec, images in zip(spec.predict, predict_inputs):
        case = load_case(images, model.card, locate=model.locate)
        _, label = predict_case(model.network, case, model.card, device)
        path = write_image(label, inside_job(job_dir, f"{PREDICTIONS_DIR}/{_output_name(case_spec)}"))
        emit({"event": "prediction", "input": str(images[0]), "path": str(path.relative_to(job_dir))})
    emit({"event": "finished", "adapter": str(adapter.relative_to(job_dir)),
          "best_agreement": summary["best_agreement"], "best_step": summary["best_step"], "esh_source": summary["esh_source"], "seconds": summary["seconds"],
          "exit_code": EXIT_FINISHED})
    return EXIT_FINISHED
