"""`peftadapt` command line: adapt, predict, demo, models. Failures end with one line and a non-zero exit code."""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import PEFTAdaptError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class TqdmProgress:
    """Training events → a tqdm bar (loss, audit Dice)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.last_dice = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if event["event"] == "audit":
            self.last_dice = event["dice"]
        if event["event"] == "step":
            if self.bar is None:
                self.bar = tqdm(total=event["steps"], desc=self.description, unit="step", file=sys.stderr)
            postfix = {"loss": f"{event['loss']:.3f}"}
            if self.last_dice is not None:
                postfix["audit_dice"] = f"{self.last_dice:.3f}"
            self.bar.set_postfix(postfix)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _case(values: Sequence[str]):
    from .jobs import CaseSpec

    image, label = values
    return CaseSpec([str(Path(p).resolve()) for p in image.split(",")], str(Path(label).resolve()))


def _images(image: str):
    from .jobs import CaseSpec

    return CaseSpec([str(Path(p).resolve()) for p in image.split(",")])


def run_worker_with_progress(job_dir: Path, description: str, resume: bool = False) -> dict:
    """Run a job in this process through the worker's own path, showing a tqdm bar; return the final status."""
    import json

    from .jobs.events import STATUS_FILE
    from .worker import EXIT_FINISHED, run_job

    progress = TqdmProgress(description)
    try:
        code = run_job(job_dir, resume=resume, emit_extra=progress, echo=False)
    finally:
        progress.close()
    status = json.loads((job_dir / STATUS_FILE).read_text()) if (job_dir / STATUS_FILE).exists() else {}
    if code != EXIT_FINISHED:
        reason = status.get("message") or status.get("reason") or f"worker exit code {code}"
        raise PEFTAdaptError(f"adaptation did not finish ({status.get('state', 'error')}): {reason}")
    return status


def cmd_models(args: argparse.Namespace) -> int:
    from .models.catalog import models_dir
    from .models.registry import DEFAULT_MODEL, list_models

    rows, problems = list_models()
    for row in rows:
        default = " (default)" if row.id == DEFAULT_MODEL else ""
        card = row.card
        print(f"{row.id}{default}: {card.title if card else row.path} [{row.format}]")
        if card is not None:
            labels = ", ".join(label.name for label in card.labels[1:])
            print(f"    modality {card.modality}; labels {labels}; license {card.license}")
        print(f"    status: {row.status}")
    print(f"model folder: {models_dir()} (set PEFTADAPT_MODELS to use another)")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from .models.catalog import torchscript_file
    from .models.trust import store_path, trust_file

    path = torchscript_file(Path(args.path).resolve())
    digest = trust_file(path)
    print(f"trusted {path}\n    sha256 {digest}\n    recorded in {store_path()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .models.registry import load_model
    from .pipeline import predict_file, with_adapter

    model = with_adapter(load_model(args.model), args.adapter)
    path, _ = predict_file(model, args.image.split(","), args.output, args.device)
    print(f"wrote {path}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .jobs import JobSpec, MethodSpec, TrainSpec, write_job

    label_free = args.method == "label-free"
    if args.target and not label_free:
        raise PEFTAdaptError("--target (an unlabelled volume) is for --method label-free; "
                             "other methods need --train IMAGE LABEL")
    if not label_free and not args.train:
        raise PEFTAdaptError("adapt needs --train IMAGE LABEL (or --method label-free with --target IMAGE)")
    job_dir = Path(args.output).resolve()
    spec = JobSpec(
        model=args.model,
        support=[_case(v) for v in args.train or []] + [_images(image) for image in args.target or []],
        audit=[_case(v) for v in args.audit or []],
        source=[_case(v) for v in args.source or []],
        method=MethodSpec(args.method, rank=args.rank, budget=args.budget),
        train=TrainSpec(steps=args.steps, lr=args.lr, audit_every=args.audit_every, seed=args.seed, device=args.device),
        predict=[_images(image) for image in args.predict or []],
    )
    if not args.resume:
        write_job(job_dir, spec)
    status = run_worker_with_progress(job_dir, "adapting", resume=args.resume)
    print(f"adapter: {job_dir / 'adapter'}")
    if label_free:
        print(f"ESH/decoder agreement: best {status.get('best_agreement', float('nan')):.4f}")
    if not label_free or args.audit:
        best, last = status.get("best_dice", float("nan")), status.get("last_dice", float("nan"))
        print(f"audit Dice: best {best:.4f}, final {last:.4f}")
    for prediction in sorted((job_dir / "predictions").glob("*")) if (job_dir / "predictions").exists() else []:
        print(f"wrote {prediction}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    progress = TqdmProgress("adapting deepbet")
    try:
        result = run_demo(args.output, steps=args.steps, rank=args.rank, seed=args.seed, progress=progress)
    finally:
        progress.close()
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .models.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="peftadapt", description="Adapt a pretrained 3D segmentation model to your site with a few labelled volumes."
    )
    parser.add_argument("--version", action="version", version=f"peftadapt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the foundation models and whether each can be loaded here")
    models.set_defaults(func=cmd_models)

    trust = sub.add_parser("trust", help="allow a TorchScript model file to run (it is code: only from a source you "
                                         "trust); remembered by its sha256")
    trust.add_argument("path", help="the TorchScript file, or the model folder holding it")
    trust.set_defaults(func=cmd_trust)

    predict = sub.add_parser("predict", help="segment a volume with a model (and optionally an adapter)")
    predict.add_argument("--model", default=DEFAULT_MODEL, help="model id (see `peftadapt models`) or model folder path")
    predict.add_argument("--adapter", help="adapter folder written by `peftadapt adapt`")
    predict.add_argument("--image", required=True, help="input volume (NIfTI/NRRD/MHA); channels comma-separated")
    predict.add_argument("--output", required=True, help="output label map path (.nii.gz, .nrrd, .mha)")
    predict.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    predict.set_defaults(func=cmd_predict)

    adapt = sub.add_parser("adapt", help="fine-tune adapters on a few labelled target volumes")
    adapt.add_argument("--model", default=DEFAULT_MODEL, help="model id (see `peftadapt models`) or model folder path")
    adapt.add_argument("--train", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="a support case (repeatable, required unless label-free); channels comma-separated")
    adapt.add_argument("--audit", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="a held-out case whose Dice is audited during adaptation (repeatable; required unless "
                            "label-free, where it is evaluation only)")
    adapt.add_argument("--target", action="append", metavar="IMAGE",
                       help="label-free: an unlabelled target volume to adapt to (repeatable)")
    adapt.add_argument("--source", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="label-free: a labelled source-like case to train the early segmentation head (optional)")
    adapt.add_argument("--method", default="lora", choices=METHODS,
                       help="sea-peft chooses adapters under --budget; label-free needs only --target volumes "
                            "(docs/labelfree.md); the others are fixed topologies")
    adapt.add_argument("--rank", type=int, default=4, help="rank of lora / convlora / salt's residual update")
    adapt.add_argument("--budget", type=float, help="trainable-parameter budget: fraction of the model (≤ 1) or count")
    adapt.add_argument("--steps", type=int, default=200)
    adapt.add_argument("--lr", type=float, default=2e-3)
    adapt.add_argument("--audit-every", type=int, default=20)
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    adapt.add_argument("--resume", action="store_true", help="continue the job in --output from its last checkpoint")
    adapt.add_argument("--predict", action="append", metavar="IMAGE", help="segment this volume afterwards (repeatable)")
    adapt.add_argument("--output", required=True, help="job folder: job.json, events.jsonl, checkpoint/, adapter/, predictions/")
    adapt.set_defaults(func=cmd_adapt)

    demo = sub.add_parser("demo", help="adapt the default model to a shifted MRI contrast, using installed files only")
    demo.add_argument("--output", default="peftadapt-demo", help="output folder (default: ./peftadapt-demo)")
    demo.add_argument("--steps", type=int, default=80)
    demo.add_argument("--rank", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PEFTAdaptError as exc:
        print(f"peftadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("peftadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line for the user, traceback to a file
        with tempfile.NamedTemporaryFile("w", prefix="peftadapt-", suffix=".log", delete=False) as log:
            traceback.print_exc(file=log)
        print(f"peftadapt: internal error: {type(exc).__name__}: {exc} (traceback: {log.name})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
