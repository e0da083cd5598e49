"""Background worker: `python -m PEFTAdaptLib.worker JOBDIR [--resume] [--device cpu]`.

The same steps for every method: validate every input → build the method's units → train (checkpointed,
cancellable) → export the adapter and predictions; reports through `events.jsonl` / `status.json`
(docs/worker.md). Exit codes: 0 finished, 2 invalid input, 3 failed, 4 cancelled, 5 job folder locked.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .adapters import count_trainable, load_adapters, save_adapters, train_in_full
from .checkpoint import check_same_job, latest_checkpoint, load_checkpoint, save_checkpoint
from .data.augment import AugmentationConfig
from .data.cases import Case, load_case
from .data.formats import prediction_name
from .data.holdout import split_for_audit
from .data.io import read_image, same_geometry, write_image
from .data.sparse import read_annotated
from .data.transforms import to_array
from .errors import InputError, ModelError, PEFTAdaptError
from .jobs.client import (
    ADAPTER_DIR, CANCEL_FILE, EXIT_CANCELLED, EXIT_FAILED, EXIT_FINISHED, EXIT_INVALID, EXIT_LOCKED,
)
from .jobs.events import EventLog
from .jobs.files import job_subfolder, refuse_linked_folder, refuse_links, remove, replace_folder, write_file
from .jobs.lock import JobLock, JobLocked
from .jobs.runner import STOP_SIGNALS
from .jobs.spec import JOB_FILE, CaseSpec, JobSpec, load_job, resolve_input
from .methods import BuildContext, Cases, Plan
from .methods.base import SOURCE_START
from .models.card import TRAINED_IN_FULL, holds_untrained_head, refuse_untrained_head
from .models.foundation import FoundationModel
from .models.registry import load_model
from .selection import SelectionRule
from .training import (
    AuditScorer, SupervisedObjective, TrainConfig, Trainer, TrainingContext, TrainingDiverged, audit_change,
    phase_event,
)
from .uncertainty import companion_paths, predict_with_uncertainty
from .vouch import (
    AUDIT_CHANGE, AUDIT_COVERS, SOURCE_KEPT, audit_change_of, audit_covers_of, holds_the_source,
    one_volume_caveat, same_scan_caveat, same_volume_audit, volume_digest, volume_warning,
)

TRACEBACK_FILE = "traceback.txt"
PREDICTIONS_DIR = "predictions"
#: how the messages name what chose the state kept, by the scorer's event: the audit's selection rule, or (label-free)
#: the highest ESH/decoder agreement, where there is no audit at all
CHOSEN_BY = {
    "audit": {"score": "audit dice", "best": "the best so far that passed the selection rule",
              "none": "no state passed the selection rule", "unscored": "no audit after training",
              "no_gain": "no reliable gain on the audit"},
    "agreement": {"score": "agreement", "best": "the highest ESH/decoder agreement so far",
                  "none": "no state's ESH/decoder agreement rose above step 0's",
                  "unscored": "no ESH/decoder agreement measured after training",
                  "no_gain": "ESH/decoder agreement never rose above step 0's"},
}


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
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or self.file.exists()


def run_job(job_dir: str | Path, resume: bool = False, device: str | None = None,
            emit_extra: Callable[[dict], None] | None = None, echo: bool = True) -> int:
    """Run one job to its end; returns the exit code. `emit_extra` also receives every event."""
    try:
        refuse_linked_folder(Path(job_dir).absolute())  # before resolving, which would follow it
    except InputError as exc:
        print(f"peftadapt worker: {exc}", file=sys.stderr)
        return EXIT_INVALID
    job_dir = Path(job_dir).resolve()
    if not job_dir.is_dir():
        print(f"peftadapt worker: {job_dir}: job folder not found", file=sys.stderr)
        return EXIT_INVALID
    try:
        lock = JobLock(job_dir).__enter__()
    except JobLocked as exc:
        print(f"peftadapt worker: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (OSError, PEFTAdaptError) as exc:
        print(f"peftadapt worker: {job_dir}: cannot lock the job folder ({exc})", file=sys.stderr)
        return EXIT_INVALID
    try:
        refuse_links(job_dir)  # nothing is written in a folder whose links could lead the writes elsewhere
        log = EventLog(job_dir, echo=echo)
    except (OSError, PEFTAdaptError) as exc:
        lock.__exit__(None, None, None)
        print(f"peftadapt worker: {exc}", file=sys.stderr)
        return EXIT_INVALID

    def emit(event: dict) -> None:
        log(event)
        if emit_extra is not None:
            emit_extra(event)

    try:
        return Run(job_dir, emit, CancelWatch(job_dir)).execute(resume, device)
    except TrainingDiverged as exc:  # nothing of the diverged state is saved: the last checkpoint stays
        emit({"event": "failed", "message": str(exc), "exit_code": EXIT_FAILED})
        return EXIT_FAILED
    except PEFTAdaptError as exc:
        needs = {"needs": exc.needs} if exc.needs else {}
        emit({"event": "failed", "message": str(exc), "exit_code": EXIT_INVALID, **needs})
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 - any crash must end as a `failed` event with the traceback on disk
        # No checkpoint here: a crash mid-step leaves a state that is not consistent to resume from; the last
        # periodic checkpoint (written between steps) is kept.
        write_file(job_dir / TRACEBACK_FILE, traceback.format_exc())
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
            message = ("out of memory: use a smaller patch size, fewer patches per step, or the CPU "
                       f"(--device cpu) — {message}")
        emit({"event": "failed", "message": message, "traceback": TRACEBACK_FILE, "exit_code": EXIT_FAILED})
        return EXIT_FAILED
    finally:
        log.close()
        lock.__exit__(None, None, None)


class Run:
    """One job, step by step: validate → build → train → export."""

    def __init__(self, job_dir: Path, emit: Callable[[dict], None], should_stop: Callable[[], bool]):
        self.job_dir, self.emit, self.should_stop = job_dir, emit, should_stop

    # -- validate ------------------------------------------------------------------------------------------------
    def cases(self, specs: list[CaseSpec], model: FoundationModel, labelled: bool) -> list[Case]:
        cases = []
        for spec in specs:
            images = [resolve_input(self.job_dir, p) for p in spec.images]
            label = resolve_input(self.job_dir, spec.label) if labelled and spec.label else None
            annotated = resolve_input(self.job_dir, spec.annotated) if label and spec.annotated else None
            # named as the user's file, not the job's copy of it, in its messages too
            cases.append(load_case(images, model.card, label, model.locate, annotated, spec.name or None))
        return cases

    def predict_inputs(self, spec: JobSpec) -> list[list[Path]]:
        inputs = [[resolve_input(self.job_dir, p) for p in case.images] for case in spec.predict]
        for images in inputs:
            for path in images:
                read_image(path)
        return inputs

    def execute(self, resume: bool, device_override: str | None) -> int:
        spec = load_job(self.job_dir)
        checkpoint = latest_checkpoint(self.job_dir) if resume and spec.task == "adapt" else None
        if checkpoint is not None:
            check_same_job(checkpoint, spec, self.job_dir / JOB_FILE)
        if resume:
            (self.job_dir / CANCEL_FILE).unlink(missing_ok=True)  # the request that stopped the last session
        device = select_device(device_override or spec.train.device)
        model = load_model(spec.model)
        if isinstance(model.network, torch.jit.ScriptModule) and spec.task == "adapt":
            raise ModelError(f"{model.files.get('network', spec.model)}: a TorchScript model predicts "
                             "(`peftadapt predict`) but adaptation jobs need an eager network: give its MONAI bundle "
                             "or nnU-Net folder instead")
        if spec.task == "predict":
            return self.predict_task(spec, model, device)
        return self.adapt_task(spec, model, device, resume, checkpoint)

    # -- adapt ---------------------------------------------------------------------------------------------------
    def adapt_task(self, spec: JobSpec, model: FoundationModel, device: str, resume: bool,
                   checkpoint: Path | None) -> int:
        method = spec.method
        labelled = method.needs_labels
        patch_size = model.card.training_patch(spec.train.patch_size)
        if not labelled and any(case.label for case in spec.support):
            self.emit({"event": "warning", "message": f"{method.name} ignores the labels of the support volumes; "
                                                       "give them as audit cases to see their Dice"})
        cases = Cases(self.cases(spec.support, model, labelled), self.cases(spec.audit, model, True),
                      self.cases(spec.source, model, True))
        if spec.train.patch_size:
            check_patch_fits(patch_size, cases.support, model.card.divisible_by)
        # an audit on slabs of the training scans, or on one volume, vouches for those volumes only (`trained_on`); the
        # caveat says so
        untrained_start = not spec.warm_start and bool(model.card.extra.get(TRAINED_IN_FULL))  # a new head: no source
        shown = "Dice" if untrained_start else "gain"
        held_out, trained_on, audit_caveat = [], [], None
        if labelled and not cases.audit:  # audit on held-out slabs of the support volumes
            trained_on = [volume_digest(case.image) for case in cases.support]
            cases.support, cases.audit, held_out = split_for_audit(cases.support, SelectionRule().fewest_units())
            audit_caveat = same_volume_audit(held_out, shown)
        elif labelled and (audit_caveat := (same_scan_caveat(cases.support, cases.audit, shown)
                                            or one_volume_caveat(cases.audit, shown))):
            trained_on = [volume_digest(case.image) for case in cases.support + cases.audit]
        predict_inputs = self.predict_inputs(spec)
        card = replace(model.card, patch_size=patch_size)
        total = model.num_parameters()
        torch.manual_seed(spec.train.seed)  # adapter initialisation is part of the seeded run
        warm = resolve_input(self.job_dir, spec.warm_start) if spec.warm_start else None
        warm_covers, warm_is_source = None, False
        if warm is not None:  # the units (and gates) of the earlier round, trained further as they are
            warm_config = load_adapters(model.network, warm, model.base_fingerprint)
            warm_covers, warm_is_source = audit_covers_of(warm_config, warm), holds_the_source(warm_config)
            plan = Plan(info={"warm_start": spec.warm_start})
        else:
            plan = method.build(BuildContext(model.network, card, total, spec.lr, spec.train.steps,
                                             spec.train.patches_per_step, spec.train.seed, device, cases, self.emit))
            if card.extra.get(TRAINED_IN_FULL):  # a new head: trained in full whatever the method
                plan.info["trained_in_full"] = train_in_full(model.network, card.extra[TRAINED_IN_FULL])
        config = TrainConfig(steps=spec.train.steps, lr=spec.lr, patches_per_step=spec.train.patches_per_step,
                             audit_every=spec.train.audit_every, seed=spec.train.seed, device=device,
                             start_is_candidate=not untrained_start)
        objective = plan.objective or SupervisedObjective(cases.support, card.patch_size, config.patches_per_step,
                                                          config.pos_fraction, config.seed,
                                                          AugmentationConfig.from_card(card.extra))
        scorer = plan.scorer or AuditScorer(cases.audit, card, device)
        context = TrainingContext(model.network, card, cases.audit, device, self.emit)
        trainer = Trainer(objective, scorer, context, config, plan.hooks)
        metadata = {"model": model.card.id, "method": method.to_dict(), "rank": plan.rank, "seed": config.seed,
                    **plan.info}
        if resume and checkpoint is None:
            self.emit({"event": "warning", "message": "no checkpoint to resume from; starting from the beginning"})
        if checkpoint is not None:
            load_checkpoint(checkpoint, trainer, model.base_fingerprint, spec)
        trainer.prepare()  # e.g. SEA-PEFT's first allocation: the trainable count below is the real one
        self.emit({"event": "started", "task": "adapt", "model": model.card.id, "method": method.name,
                   "rank": plan.rank, "budget": plan.budget, "device": device, "steps": config.steps, "lr": config.lr,
                   "resumed_from_step": trainer.step, "trainable": count_trainable(model.network), "total": total,
                   "pid": os.getpid(), **({"audit_held_out": held_out} if held_out else {}), **plan.info,
                   # a resumed run's start score, from its checkpoint: what the summary compares with, whatever
                   # became of the earlier sessions' events
                   **({f"start_{scorer.key}": trainer.baseline.value} if trainer.baseline is not None else {})})

        start = ("the adapter it started from" if warm is not None else
                 "the model's untrained new head" if untrained_start else plan.start)
        # an audit too thin for any gain to pass the rule: said before the training, and again with the outcome
        too_few = scorer.too_few_units() if isinstance(scorer, AuditScorer) and not untrained_start else ""
        if too_few:
            self.emit({"event": "warning", "message": f"{too_few}; this run will keep {start}"})

        def checkpoint_now(t: Trainer) -> None:
            folder = save_checkpoint(self.job_dir, t, model.base_fingerprint, metadata, spec)
            self.emit({"event": "checkpoint", "step": t.step, "path": str(folder.relative_to(self.job_dir))})

        # a cancel while the state to keep was chosen (no step to stop between) is honoured here: resumed, the job
        # goes on from its last step's checkpoint
        completed = trainer.run(self.should_stop, checkpoint_now, spec.train.checkpoint_every)
        completed = completed and not self.should_stop()
        checkpoint_now(trainer)
        summary = trainer.summary()
        trainer.restore_best()  # a cancelled job keeps its best state so far as its adapter too (`final: false`)
        source_kept = summary["kept_start"] and (start == SOURCE_START or warm_is_source)
        checked = None
        if completed and cases.audit and source_kept:  # the source itself changes no audit case: nothing to measure
            checked = {}
        elif completed and cases.audit:
            self.emit(phase_event("choosing", trainer.step, "measuring how much the kept state changes the audit "
                                                            "volumes"))
            checked = audit_change(model.network, cases.audit, card, device)
        # what the audit vouches for: the earlier round's record when its adapter is kept, the training (and audit)
        # volumes when a state judged on slabs of their scans or on one volume is kept, nothing more to say otherwise
        covers = warm_covers if summary["kept_start"] else trained_on if audit_caveat else None
        metadata.update({f"best_{scorer.key}": summary["best_score"], "best_step": summary["best_step"],
                         "steps": config.steps, "final": completed, SOURCE_KEPT: source_kept,
                         **({AUDIT_CHANGE: {str(i): d for i, d in checked.items()}} if checked is not None else {}),
                         **({AUDIT_COVERS: covers} if covers is not None else {})})
        adapter = replace_folder(self.job_dir, ADAPTER_DIR,
                                 lambda folder: save_adapters(model.network, folder, model.base_fingerprint, metadata))
        cancelled = {"event": "cancelled", "reason": "cancel requested", "step": trainer.step, "adapter": ADAPTER_DIR,
                     "best_step": summary["best_step"], f"best_{scorer.key}": summary["best_score"],
                     "kept": "start" if summary["kept_start"] else "adapted", "exit_code": EXIT_CANCELLED}
        if not completed:  # the adapter holds the best state so far: say which, not the last audit's
            words = CHOSEN_BY[scorer.event]
            held = (f"{words['none']} so far: the adapter is {start}" if summary["kept_start"] else
                    f"the adapter is the state of step {summary['best_step']} ({words['score']} "
                    f"{summary['best_score']:.4f}), {words['best']}")
            when = ("while choosing the state to keep, after the last step" if trainer.step >= config.steps else
                    f"at step {trainer.step}")
            self.emit({**cancelled, "message": f"cancelled {when}; {held}"})
            return EXIT_CANCELLED
        outcome = self.outcome(summary, start, len(trainer.history), scorer.event, compared=not untrained_start,
                               why=too_few)
        final = trainer.kept_score()
        self.emit({"event": "validation", "step": config.steps, **final.fields, **summary["verdict"], **outcome,
                   "adapter": ADAPTER_DIR})
        if audit_caveat and outcome["kept"] == "adapted":
            self.emit({"event": "warning", "message": audit_caveat})
        if holds_untrained_head(metadata):
            self.emit({"event": "warning", "message": "no trained state was kept, so no prediction was written: the "
                                                      "model's new head is untrained"})
        else:
            done = self.write_predictions(spec, predict_inputs, model, device, checked, covers)
            if done < len(predict_inputs):  # the adapter is final; a resume segments every volume again
                self.emit({**cancelled, "message": f"cancelled while segmenting, {done} of {len(predict_inputs)} "
                                                  f"volume(s) done; the training had finished: {outcome['message']}"})
                return EXIT_CANCELLED
        self.emit({"event": "finished", "adapter": str(adapter.relative_to(self.job_dir)),
                   f"best_{scorer.key}": summary["best_score"], "best_step": summary["best_step"],
                   "trainable": count_trainable(model.network), "seconds": summary["seconds"], **outcome,
                   "exit_code": EXIT_FINISHED})
        return EXIT_FINISHED

    @staticmethod
    def outcome(summary: dict, start: str, audits: int, scored_by: str = "audit", compared: bool = True,
                why: str = "") -> dict:
        """What the run gives the user, in words: the adapted state, or the starting model (`start`) kept, as the
        scorer (`scored_by`: its event, CHOSEN_BY) chose it, and `why` no gain could be shown, when known. Not
        `compared`: the start was no candidate (an untrained new head), so the best trained state is kept as is."""
        if not summary["kept_start"]:
            kept = f"adapted state of step {summary['best_step']} kept"
            if not compared:
                kept += (", the best on the audit; there is no source model to compare it with, as the model's head "
                         "is new")
            return {"kept": "adapted", "message": kept}
        if audits < 2:
            return {"kept": "start", "message": f"{CHOSEN_BY[scored_by]['unscored']}: {start} is kept"}
        return {"kept": "start", "message": f"{CHOSEN_BY[scored_by]['no_gain']}: {start} is kept"
                                           + (f"; {why}" if why else "")}

    # -- predict -------------------------------------------------------------------------------------------------
    def predict_task(self, spec: JobSpec, model: FoundationModel, device: str) -> int:
        inputs = self.predict_inputs(spec)
        checked = covers = None
        source = False
        if spec.adapter:
            folder = resolve_input(self.job_dir, spec.adapter)
            config = load_adapters(model.network, folder, model.base_fingerprint)
            refuse_untrained_head(config, folder)
            checked, covers = audit_change_of(config, folder, model.card), audit_covers_of(config, folder)
            source = holds_the_source(config)
        self.emit({"event": "started", "task": "predict", "model": model.card.id, "device": device,
                   "steps": len(inputs), "adapter": spec.adapter, "pid": os.getpid()})
        if source:
            self.emit({"event": "warning", "message": "the adapter is the source model itself: the run that made it "
                                                      "found no reliable gain and kept its start, so these are the "
                                                      "source model's segmentations"})
        if self.write_predictions(spec, inputs, model, device, checked, covers) < len(inputs):
            self.emit({"event": "cancelled", "reason": "cancel requested", "exit_code": EXIT_CANCELLED})
            return EXIT_CANCELLED
        self.emit({"event": "finished", "exit_code": EXIT_FINISHED})
        return EXIT_FINISHED

    def write_predictions(self, spec: JobSpec, inputs: list[list[Path]], model: FoundationModel, device: str,
                          checked: dict[int, float] | None = None, covers: list[str] | None = None) -> int:
        """Segment every predict case, naming each one the audit cannot vouch for: changed more than on the audit
        (`checked`: audit_change), or outside the volumes a held-out-slab audit covers (`covers`; vouch.py); returns
        how many it segmented: fewer than asked when cancelled in between."""
        model.network.eval()
        if spec.predict:
            self.emit({"event": "phase", "phase": "predicting", "volumes": len(spec.predict)})
        names: set[str] = set()
        uses = Counter(c.name for c in spec.predict)
        for index, (case_spec, images) in enumerate(zip(spec.predict, inputs)):
            if self.should_stop():
                return index
            case = load_case(images, model.card, locate=model.locate)
            label, uncertainty = predict_with_uncertainty(model.network, case, model.card, device,
                                                          self.corrected_voxels(spec, case.image))
            path = job_subfolder(self.job_dir / PREDICTIONS_DIR) / prediction_name(case_spec.name,
                                                                                   case_spec.images[0], names)
            for written in (path, *companion_paths(path).values()):
                remove(written)  # an earlier prediction, or a link planted since the start: never written through
            write_image(label, path)
            extra = {kind: str(p.relative_to(self.job_dir)) for kind, p in uncertainty.write(path, case.image).items()}
            change = {model.card.labels[i].name: d for i, d in uncertainty.class_change.items()}
            self.emit({"event": "prediction", "input": case_spec.images[0], "name": case_spec.name,
                       "path": str(path.relative_to(self.job_dir)), "index": index, **extra,
                       **({"change": change} if change else {})})
            shown = f"{case_spec.name} ({path.name})" if uses[case_spec.name] > 1 else case_spec.name  # which one
            message = volume_warning(shown, case.image, uncertainty, model.card, checked, covers)
            if message:
                self.emit({"event": "warning", "message": message})
        return len(inputs)

    def corrected_voxels(self, spec: JobSpec, image) -> np.ndarray | None:
        """The annotated voxels of the sparse training cases that are this very volume (same grid, same voxels),
        as an (x, y, z) mask: its slice ranking counts the slices the user corrected as checked already."""
        mask = None
        for case in spec.support if spec.task == "adapt" else []:
            if not case.annotated:
                continue
            other = read_image(resolve_input(self.job_dir, case.images[0]))
            if same_geometry(other, image) and np.array_equal(to_array(other), to_array(image)):
                annotated = to_array(read_annotated(resolve_input(self.job_dir, case.annotated), other,
                                                    case.images[0]), np.uint8) > 0
                mask = annotated if mask is None else mask | annotated
        return mask


def check_patch_fits(patch: Sequence[int], support: Sequence[Case], step: int) -> None:
    """A requested patch larger than every training volume along every axis trains on padding, at many times the
    cost of one that just holds the largest volume: refused before training, naming that size."""
    largest = np.max([case.array.shape[1:] for case in support], axis=0)
    enough = [max(2 * step, -(-int(edge) // step) * step) for edge in largest]
    if all(p > e for p, e in zip(patch, enough)):
        raise InputError(f"train.patch_size: {list(patch)} is larger than every training volume along every axis "
                         f"(the largest is {'×'.join(map(str, largest))} voxels on the model's grid): it would train "
                         f"on padding at many times the cost; give at most {enough}")


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
