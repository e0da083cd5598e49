"""`peftadapt` command line: adapt, predict, jobs, demo, models. Failures end with one line and a non-zero exit code."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from . import __version__
from .errors import InputError, PEFTAdaptError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
CLI_TRACEBACK = "cli-traceback.txt"
#: `adapt` options that describe the job, which a resume therefore refuses (it continues the job as written)
JOB_OPTIONS = ("train", "annotated", "slices", "target", "audit", "source", "predict", "method", "rank", "budget",
               "model", "readapt", "label_map")
#: `adapt` options that set the TrainSpec field of the same name (unset: TrainSpec's default)
TRAIN_OPTIONS = ("steps", "lr", "patch_size", "patches_per_step", "audit_every", "checkpoint_every", "seed", "device")


class Parser(argparse.ArgumentParser):
    """A mistyped option is one line, like every other bad input (the usage is a --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"peftadapt: error: {message} (see: {self.prog} --help)\n")


BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class TqdmProgress:
    """Worker events → a tqdm bar (loss, audit Dice or agreement)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.score: tuple[str, float] | None = None
        self.postfix: dict[str, str] = {}
        self.in_phase = False  # the bar says a phase other than training

    def __call__(self, events: list[dict]) -> None:
        from tqdm import tqdm

        from .jobs.runstate import phase_words

        for event in events:
            if event["event"] in ("audit", "agreement"):
                key = "dice" if event["event"] == "audit" else "agreement"
                self.score = (f"audit_{key}" if key == "dice" else key, event[key])
            # shown from the start (the start's audit can take minutes before a step), else from the first step seen
            if event["event"] in ("started", "step") and event.get("task", "adapt") == "adapt" and self.bar is None:
                self.bar = tqdm(total=event["steps"], desc=self.description, unit="step", file=sys.stderr,
                                initial=event.get("resumed_from_step", event.get("step", 1) - 1), bar_format=BAR)
            if event["event"] == "started" and event.get("task") == "predict" and self.bar is None:
                self.bar = tqdm(total=event["steps"], desc=self.description, unit="volume", file=sys.stderr,
                                bar_format=BAR)
            if event["event"] == "prediction" and self.bar is not None and self.bar.unit == "volume":
                self.bar.update(1)
            if event["event"] == "step":  # drawn once: the step's count, loss and words together
                if self.in_phase:  # the start's audit is over
                    self.in_phase = False
                    self.bar.set_description(self.description, refresh=False)
                self.postfix = {"loss": f"{event['loss']:.3f}"}
                if self.score is not None:
                    self.postfix[self.score[0]] = f"{self.score[1]:.3f}"
                if event.get("eta_s") is not None:
                    self.postfix["left"] = "{}:{:02d}".format(*divmod(int(event["eta_s"]), 60))
                self.bar.set_postfix(self.postfix, refresh=False)
                self.bar.update(1)
                self.bar.refresh()  # every step, as events come in bursts (update draws at most every 0.1 s)
            if event["event"] == "phase" and self.bar is None:  # before the job's start: e.g. its first allocation
                tqdm.write(f"{self.description}: {phase_words(event)}", file=sys.stderr)
            if event["event"] == "phase" and self.bar is not None and self.bar.unit == "step":  # no time to count down
                what = f"predicting {event['volumes']} volume(s)" if "volumes" in event else phase_words(event)
                self.bar.set_description(f"{self.description} ({what})")
                self.in_phase = True
                self.postfix.pop("left", None)
                self.bar.set_postfix(self.postfix)
            if event["event"] == "validation" and self.bar is not None and event.get("dice") is not None:
                self.postfix["audit_dice"] = f"{event['dice']:.3f}"  # the kept state's, as the summary says
                self.bar.set_postfix(self.postfix)
            if event["event"] == "warning":  # on a line of its own, above the bar
                tqdm.write(f"peftadapt: warning: {event['message']}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def follow(job, description: str):
    """Show a job's progress until it ends; Ctrl-C cancels it (the worker keeps its last checkpoint)."""
    progress = TqdmProgress(description)
    try:
        try:
            return job.wait(on_events=progress)
        except KeyboardInterrupt:
            job.cancel()
            return job.wait(on_events=progress)
    finally:
        progress.close()


def _case(values: Sequence[str], labelled: bool = True, annotated: str | None = None,
          relabel: "LabelMapper | None" = None):
    from .jobs import CaseSpec

    image, label = (values if labelled else (values, None))
    images = [str(Path(p).expanduser().resolve()) for p in image.split(",")]
    label = str(Path(label).expanduser().resolve()) if label else None
    return CaseSpec(images, relabel(label, images[0]) if label and relabel else label,
                    annotated=str(Path(annotated).expanduser().resolve()) if annotated else None)


class LabelMapper:
    """--label-map: each label file given, written into `scratch` in the model's numbering (`data/labelmap.py`)."""

    def __init__(self, map_path: str, model: str, scratch: Path):
        from .data.labelmap import describe_label_map, read_label_map
        from .models.registry import model_card

        card = model_card(model)
        self.map_path, self.scratch, self.count = map_path, scratch, 0
        self.runs = read_label_map(Path(map_path).expanduser(), card)
        self.description = f"label map {map_path}: {describe_label_map(self.runs, card)}"

    def __call__(self, label: str, image: str) -> str:
        from .data.labelmap import relabel

        self.count += 1
        return str(relabel(label, image, self.runs, self.map_path, self.scratch / f"label{self.count}.nii.gz"))


class SparseOption(argparse.Action):
    """`--annotated MASK` / `--slices PLANE:I,J,…` belong to the `--train` before them."""

    def __call__(self, parser, namespace, value, option_string=None):
        if not namespace.train:
            parser.error(f"{option_string} follows the --train IMAGE LABEL it belongs to")
        sparse = dict(getattr(namespace, "sparse", None) or {})
        if len(namespace.train) - 1 in sparse:
            parser.error(f"{option_string}: one --annotated or --slices per --train")
        sparse[len(namespace.train) - 1] = (self.dest, value)
        namespace.sparse = sparse
        setattr(namespace, self.dest, value)


def _annotated(args: argparse.Namespace, index: int, scratch: Path | None) -> str | None:
    """The mask file of the index-th --train case: given, or made from its slice list in `scratch`."""
    from .data.sparse import write_slice_mask

    kind, value = (getattr(args, "sparse", None) or {}).get(index, (None, None))
    if kind == "slices":
        image = args.train[index][0].split(",")[0]
        return str(write_slice_mask(image, value, scratch / f"train{index}_annotated.nii.gz"))
    return value


def _patch_size(text: str) -> list[int]:
    """N (every edge: the model card knows whether it is 2D or 3D), X,Y or X,Y,Z."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not N, X,Y or X,Y,Z (whole numbers)") from None
    if len(sizes) > 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not N, X,Y or X,Y,Z")
    return sizes


def adapt_request(args: argparse.Namespace, scratch: Path | None = None, said: list[str] | None = None):
    """The job request the arguments describe (validated: a bad combination fails here, naming the option); masks
    made from slice lists are written into `scratch`; how a budget or a label map was read goes into `said`, to be
    printed once the job is made (a refused request gets its one line)."""
    from .jobs import JobSpec, TrainSpec
    from .methods import DEFAULT_METHOD, Budget, make_method
    from .models.registry import DEFAULT_MODEL

    said = [] if said is None else said
    budget = Budget.parse(args.budget) if args.budget is not None else None
    if budget is not None:
        said.append(f"budget {args.budget!r} understood as {budget.describe()}")
    fields = {"rank": args.rank, "budget": budget}
    method = make_method(args.method or DEFAULT_METHOD, **{k: v for k, v in fields.items() if v is not None})
    model = args.model or DEFAULT_MODEL
    relabel = LabelMapper(args.label_map, model, scratch) if args.label_map else None
    request = JobSpec(
        model=model,
        support=[_case(v, annotated=_annotated(args, i, scratch), relabel=relabel)
                 for i, v in enumerate(args.train or [])] + [_case(v, labelled=False) for v in args.target or []],
        audit=[_case(v, relabel=relabel) for v in args.audit or []],
        source=[_case(v, relabel=relabel) for v in args.source or []],
        predict=[_case(v, labelled=False) for v in args.predict or []],
        method=method,
        train=TrainSpec(**{k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}),
    )
    if relabel:
        said.append(relabel.description)
    return request


def report(job) -> int:
    """Print what the run did; returns the exit code."""
    from .jobs.client import EXIT_CANCELLED, EXIT_FAILED

    state = job.state
    if state.outcome == "failed":
        print(f"peftadapt: error: {state.message or 'the worker failed'}", file=sys.stderr)
        return state.exit_code or EXIT_FAILED
    if state.method:
        how = state.rank_reason or state.budget_reason
        print(f"method: {state.method}" + (f" — {how}" if how else ""))
    if state.trainable_text:
        print(f"trainable: {state.trainable_text}")
    for line in (state.dice_text, state.class_text):
        if line:
            print(line)
    if state.allocation_summary:
        print("allocation: " + state.allocation_summary.replace("\n", "\n            "))
    if state.message and state.outcome == "finished":
        print(f"result: {state.message}")
    if state.best_agreement is not None:
        print(f"ESH/decoder agreement: best {state.best_agreement:.4f}")
    if job.adapter_folder.is_dir():
        print(f"adapter: {job.adapter_folder}")
    for path in job.prediction_paths():
        print(f"wrote {path}")
    if state.outcome == "cancelled":
        if state.kept:
            print(f"result: {state.message}")
        print(f"cancelled; resume with: peftadapt adapt --resume --output {job.folder}", file=sys.stderr)
        return EXIT_CANCELLED
    return 0 if state.outcome == "finished" else EXIT_FAILED


def cmd_adapt(args: argparse.Namespace) -> int:
    from .jobs import JobClient

    folder = Path(args.output).expanduser().absolute()
    client = JobClient(folder.parent)
    if args.resume:
        given = [o for o in JOB_OPTIONS + TRAIN_OPTIONS if getattr(args, o) not in (None, []) and o != "device"]
        if given or args.overwrite:
            option = "--" + (given[0] if given else "overwrite").replace("_", "-")
            raise InputError(f"--resume continues the job in {folder} as its job.json says; drop {option}")
        job = client.resume(folder, device=None if args.device in (None, "auto") else args.device)
    else:
        if not (args.readapt or args.train or args.target):
            raise InputError("adapt needs --train IMAGE LABEL (or --target IMAGE for label-free methods)")
        said = []
        with tempfile.TemporaryDirectory() as scratch:  # the job folder keeps its own copy of every input
            request = (readapt_request(args, client, Path(scratch), said) if args.readapt else
                       adapt_request(args, Path(scratch), said))
            job = client.submit(request, folder, overwrite=args.overwrite)
        for line in said:
            print(f"peftadapt: {line}", file=sys.stderr)
    follow(job, "adapting")
    return report(job)


#: what a re-adapt round takes from the job it continues
READAPT_KEEPS = ("model", "audit", "target", "source", "method", "rank", "budget")


def readapt_request(args: argparse.Namespace, client, scratch: Path, said: list[str]):
    """The next round of the job in --readapt (its adapter, model, method, audit and training cases) with the
    corrected --train cases added: the request the panels' Re-adapt makes; `said` as in `adapt_request`."""
    from .jobs import load_job

    previous = Path(args.readapt).expanduser().absolute()
    kept = next((o for o in READAPT_KEEPS if getattr(args, o) not in (None, [])), None)
    if kept:
        raise InputError(f"--readapt continues the job in {previous} with its model, method and audit; drop --{kept}")
    if not args.train:
        raise InputError("--readapt needs the corrected case(s): --train IMAGE LABEL (with --slices or --annotated "
                         "for the slices you corrected)")
    # the corrections only: the earlier round's cases are in the model's numbering already
    relabel = LabelMapper(args.label_map, load_job(previous).model, scratch) if args.label_map else None
    corrected = [_case(v, annotated=_annotated(args, i, scratch), relabel=relabel) for i, v in enumerate(args.train)]
    predict = {"predict": [_case(v, labelled=False) for v in args.predict]} if args.predict else {}
    request = client.readapt_request(previous, corrected, **predict)
    if relabel:
        said.append(relabel.description)
    return replace(request, train=replace(request.train, **{k: getattr(args, k) for k in TRAIN_OPTIONS
                                                             if getattr(args, k) is not None}))


def check_output_file(path: Path, inputs: Sequence[Path] = ()) -> None:
    """Before any work: a label map path of a type we write, whose folder can be made and written, and neither it
    nor a file written beside it (`uncertainty.companion_paths`) one of the inputs."""
    from .data.formats import LABEL_MAP_SUFFIXES, LABEL_SUFFIX, image_suffix
    from .jobs.files import check_writable
    from .uncertainty import companion_paths

    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the output file, e.g. {path / 'segmentation.nii.gz'}")
    suffix = image_suffix(path, LABEL_MAP_SUFFIXES)
    if suffix in LABEL_SUFFIX:  # DICOM: a label map is no DICOM image (DICOM SEG is a format of its own)
        raise InputError(f"--output {path}: a label map cannot be written as {suffix}; write the label as "
                         f"{LABEL_SUFFIX[suffix]} or .nii.gz")
    check_writable(path.parent, "the output")
    for target in (path, *companion_paths(path).values()):
        if any(target.exists() and given.exists() and target.samefile(given) for given in inputs):
            raise InputError(f"{target}: is an input of this command and would be overwritten; give another --output")


def cmd_predict(args: argparse.Namespace) -> int:
    """A predict job, like every front-end's (the audit's naming of volumes it cannot vouch for included), in a
    private scratch folder; its label maps and uncertainty files are then written where --output says: the file
    for one --image, the folder for several (each named as an adapt job names its predictions)."""
    from .data.formats import distinct_names, prediction_name
    from .jobs import CaseSpec, JobClient, JobSpec, TrainSpec
    from .jobs.client import EXIT_CANCELLED, EXIT_FAILED

    output = Path(args.output).expanduser().absolute()
    given = [[Path(p).expanduser().absolute() for p in image.split(",")] for image in args.image]
    names = distinct_names([str(images[0]) for images in given])
    cases = [CaseSpec([str(p) for p in images], None, names[str(images[0])]) for images in given]
    if len(cases) == 1:
        targets = [output]
    elif output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: is a file; with several --image give the folder to write their "
                         "segmentations in")
    else:
        taken: set[str] = set()
        targets = [output / prediction_name(case.name, case.images[0], taken) for case in cases]
    for target in targets:  # before torch and the model are loaded
        check_output_file(target, [p for images in given for p in images])
    adapter = str(Path(args.adapter).expanduser().absolute()) if args.adapter else None
    request = JobSpec(model=args.model, task="predict", adapter=adapter, predict=cases,
                      train=TrainSpec(**({"device": args.device} if args.device else {})))
    with tempfile.TemporaryDirectory(prefix="peftadapt-predict-") as scratch:
        job = JobClient(scratch).submit(request, Path(scratch) / "job")
        follow(job, "segmenting")
        if job.state.message:  # the worker read the job's copies, in a scratch folder gone once this command ends
            job.state.message = _with_users_paths(job.state.message, job, request)
        for prediction, target in zip(job.prediction_paths(), targets):  # those written before a failure or cancel
            for path in deliver(prediction, target):
                print(f"wrote {path}")
        state = job.state
    if state.outcome == "finished":
        return 0
    if state.outcome == "cancelled":
        print(f"peftadapt: cancelled: {len(state.predictions)} of {len(cases)} volume(s) segmented",
              file=sys.stderr)
        return EXIT_CANCELLED
    print(f"peftadapt: error: {state.message or 'the worker failed'}", file=sys.stderr)
    return state.exit_code or EXIT_FAILED


def _with_users_paths(message: str, job, request) -> str:
    """`message` with the job's copies of the images and adapter named as the user gave them."""
    copies = [pair for copy, case in zip(job.spec.predict, request.predict) for pair in zip(copy.images, case.images)]
    if request.adapter:
        copies.append((job.spec.adapter, request.adapter))
    for copy, given in copies:
        path = job.folder / copy
        for name in (str(path.resolve()), str(path)):
            message = message.replace(name, given)
    return message


#: what each file of a prediction is, in messages
RESULT_NAMES = {"uncertainty": "uncertainty map", "disagreement": "disagreement map", "slices": "slice list"}


def deliver(prediction: Path, output: Path) -> list[Path]:
    """A job's label map and its uncertainty files, rewritten at `output` (in its format) and beside it, all or
    none: every file is read and checked first, then each is written under a temporary name beside its place and
    renamed there once all are written, so a refusal leaves nothing half-made at the user's paths."""
    from .uncertainty import companion_paths

    sources = {output: (prediction, "label map")}
    sources |= {companion_paths(output)[kind]: (path, RESULT_NAMES[kind])
                for kind, path in companion_paths(prediction).items() if path.is_file()}
    contents = {target: _read_result(source, what, output) for target, (source, what) in sources.items()}
    partial: dict[Path, Path] = {}
    try:
        for target, content in contents.items():
            partial[target] = target.with_name(f".partial-{os.getpid()}-{target.name}")
            _write_result(content, partial[target], target)
        for target, temporary in partial.items():
            temporary.replace(target)
    finally:
        for temporary in partial.values():
            temporary.unlink(missing_ok=True)
    return list(contents)


def _read_result(source: Path, what: str, output: Path):
    """A file the job wrote in its scratch folder, read and checked (an image without its input format's header
    fields, which another format cannot hold); a problem is told about the user's output, since the scratch folder
    is gone by the time the message is read."""
    from .data.io import read_image

    if source.suffix == ".json":
        return source.read_text()
    try:
        image = read_image(source, f"this run's {what}")
    except PEFTAdaptError as exc:
        problem = str(exc).removeprefix(f"{source}: ").split("; ")[0]
        raise type(exc)(f"{output}: nothing written: {problem} (the model or adapter gives unusable values on "
                        "this image)") from None
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def _write_result(content, temporary: Path, target: Path) -> None:
    """Write `content` under its temporary name; a failure names the user's path, not the temporary one."""
    from .data.io import write_image

    try:
        if isinstance(content, str):
            temporary.write_text(content)
        else:
            write_image(content, temporary)
    except PEFTAdaptError as exc:
        raise type(exc)(str(exc).replace(str(temporary), str(target))) from None
    except OSError as exc:
        raise InputError(f"{target}: cannot write output ({exc.strerror or exc})") from None


def cmd_jobs(args: argparse.Namespace) -> int:
    from .jobs import JobClient

    infos = JobClient(args.work).jobs()
    for info in infos:
        progress = f"step {info.step}/{info.steps}" if info.steps else ""
        dice = f", audit Dice {info.dice_text}" if info.dice is not None else ""
        print(f"{info.folder.name}: {info.task} {info.method} on {info.model} — {info.state} {progress}{dice}")
        if info.message and info.state in ("failed", "interrupted", "invalid"):
            print(f"    {info.message}")
    if not infos:
        print(f"no job in {Path(args.work).absolute()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    from .jobs import TrainSpec

    TrainSpec(steps=args.steps, seed=args.seed)  # bad numbers are refused before the demo data is made
    progress = TqdmProgress("adapting deepbet")
    try:
        result = run_demo(args.output, steps=args.steps, seed=args.seed, progress=progress)
    finally:
        progress.close()
    print(format_table(result))
    return 0


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
            channels = f"; {card.channel_count()} image channels per case" if card.input_channels > 1 else ""
            print(f"    modality {card.modality}{channels}; labels {labels}; license {card.license}")
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


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from .web.app import serve
    except ImportError as exc:
        raise InputError(f"peftadapt web needs the 'web' extra ({exc.name} is missing): "
                         "pip install 'peftadapt[web]'") from None
    serve(args.host, args.port, args.work, args.data)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .jobs.spec import DEVICES, TrainSpec
    from .methods import DEFAULT_METHOD, method_class, method_names
    from .models.registry import DEFAULT_MODEL

    defaults = TrainSpec()
    parser = Parser(
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
    predict.add_argument("--adapter", help="the job folder of `peftadapt adapt`, or its adapter/ folder")
    predict.add_argument("--image", required=True, action="append",
                         help="input volume (NIfTI/NRRD/MHA/MGZ…); channels comma-separated; repeatable")
    predict.add_argument("--output", required=True,
                         help="output label map path (.nii.gz, .nrrd, .mha, .mgz, .png…; not .dcm); its uncertainty "
                              "map and slice ranking are written beside it (<name>_uncertainty…, <name>_slices.json). "
                              "With several --image: a folder, where each is written as <name>_seg in its input's "
                              "format, <name> told apart by its folder where file names repeat")
    predict.add_argument("--device", choices=DEVICES, help=f"default: {defaults.device}")
    predict.set_defaults(func=cmd_predict)

    methods = "; ".join(f"{name}: {method_class(name).label}" for name in method_names())
    adapt = sub.add_parser("adapt", help="fine-tune adapters on a few labelled target volumes",
                           description=f"Methods — {methods}.")
    adapt.add_argument("--model", help=f"model id (see `peftadapt models`) or model folder path "
                                       f"(default: {DEFAULT_MODEL})")
    adapt.add_argument("--train", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="an annotated training case (repeatable); channels comma-separated")
    adapt.add_argument("--annotated", action=SparseOption, metavar="MASK",
                       help="the --train case before it is annotated only where MASK is 1 (sparse: e.g. the slices "
                            "you corrected); MASK on the image's grid")
    adapt.add_argument("--slices", action=SparseOption, metavar="PLANE:I,J,…",
                       help="the --train case before it is annotated only on these slices (axial, coronal, sagittal "
                            "or an index axis 0/1/2; of a 2D image, 0 or 1: columns or rows; indices on the image's "
                            "grid), e.g. axial:12,40,77")
    adapt.add_argument("--audit", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="a held-out annotated case whose Dice decides whether the adapted model is better "
                            "(repeatable; for label-free, evaluation only)")
    adapt.add_argument("--label-map", metavar="MAP.json",
                       help="the labels given are in another numbering (e.g. FreeSurfer's aseg): MAP.json maps the "
                            'model\'s class names to their values, e.g. {"White Matter": [2, 41], "Grey Matter": '
                            "[3, 42]}; a value it does not list is background")
    adapt.add_argument("--target", action="append", metavar="IMAGE",
                       help="an unannotated target volume (repeatable; label-free)")
    adapt.add_argument("--source", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                       help="label-free: an annotated source-like case to train the early segmentation head (optional)")
    adapt.add_argument("--method", choices=method_names(), help=f"adaptation method (default: {DEFAULT_METHOD})")
    adapt.add_argument("--rank", type=int, help="rank of lora / convlora / salt / label-free (default: the largest "
                                                "that fits the budget, or the method's default)")
    adapt.add_argument("--budget", help="trainable-parameter budget: 1%%, 0.01 or 1.0 (fraction) or 21262 (count); "
                                        "default: the model's (1 %%)")
    adapt.add_argument("--steps", type=int, help=f"training steps (default: {defaults.steps})")
    adapt.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    adapt.add_argument("--patch-size", type=_patch_size,
                       help="training patch: N (N×N for a 2D model, N×N×N for a 3D one), X,Y or X,Y,Z (default: the "
                            "model's)")
    adapt.add_argument("--patches-per-step", type=int, help=f"default: {defaults.patches_per_step}")
    adapt.add_argument("--audit-every", type=int, help=f"steps between audits (default: {defaults.audit_every})")
    adapt.add_argument("--checkpoint-every", type=int,
                       help=f"steps between checkpoints, 0: only at the end (default: {defaults.checkpoint_every})")
    adapt.add_argument("--seed", type=int, help=f"default: {defaults.seed}")
    adapt.add_argument("--device", choices=DEVICES, help=f"default: {defaults.device}; with --resume, where to "
                                                         "continue")
    adapt.add_argument("--predict", action="append", metavar="IMAGE", help="segment this volume afterwards (repeatable)")
    adapt.add_argument("--output", required=True, help="job folder: job.json, events.jsonl, checkpoint/, adapter/, predictions/")
    adapt.add_argument("--resume", action="store_true", help="continue the job in --output from its last checkpoint")
    adapt.add_argument("--readapt", metavar="JOB",
                       help="a new round after the finished job in JOB: from its adapter, with its model, method, "
                            "audit and training cases, plus the corrected --train cases; the audit judges the round "
                            "against that adapter")
    adapt.add_argument("--overwrite", action="store_true", help="replace an earlier (not running) job in --output")
    adapt.set_defaults(func=cmd_adapt)

    jobs = sub.add_parser("jobs", help="list the jobs in a work folder and their state")
    jobs.add_argument("--work", default=".", help="folder holding job folders (default: here)")
    jobs.set_defaults(func=cmd_jobs)

    web = sub.add_parser("web", help="the panel in the browser: slice views, segment editor, live Dice chart")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only); any other "
                                                          "address requires the token printed with the URL")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--work", default="peftadapt-web", help="work folder: jobs, uploads, downloads "
                                                            "(default: ./peftadapt-web)")
    web.add_argument("--data", help="a folder whose image files the page may pick (read in place)")
    web.set_defaults(func=cmd_web)

    demo = sub.add_parser("demo", help="adapt the default model to a shifted MRI contrast, using installed files only")
    demo.add_argument("--output", default="peftadapt-demo", help="output folder (default: ./peftadapt-demo)")
    demo.add_argument("--steps", type=int, default=80)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with stop_signals_interrupt():
        return run(args)


@contextmanager
def stop_signals_interrupt():
    """A kill or a closed terminal stops a run as Ctrl-C does (the worker cancelled, its checkpoint kept), instead
    of leaving the worker to train on unattended."""
    from .jobs.runner import STOP_SIGNALS

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    stops = [sig for sig in STOP_SIGNALS if sig != signal.SIGINT]
    previous = {sig: signal.signal(sig, interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except PEFTAdaptError as exc:
        print(f"peftadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("peftadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line for the user, traceback to a file
        try:
            where = f"traceback: {save_traceback(args)}"
        except (OSError, PEFTAdaptError) as problem:
            where = f"the traceback could not be saved: {problem}"
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"peftadapt: internal error: {message} ({where})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def save_traceback(args: argparse.Namespace) -> Path:
    """An internal error's traceback: in the job folder for `adapt` once it holds a job, else in the user's log
    folder (`<config folder>/logs`, beside the trust store) — never in a shared temporary folder."""
    from .jobs.files import write_file
    from .jobs.spec import JOB_FILE
    from .models.trust import config_dir

    output = Path(args.output).expanduser().absolute() if args.command == "adapt" else None
    if output is not None and (output / JOB_FILE).is_file():
        return write_file(output / CLI_TRACEBACK, traceback.format_exc())
    logs = config_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return write_file(logs / f"peftadapt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", traceback.format_exc())


if __name__ == "__main__":
    sys.exit(main())
