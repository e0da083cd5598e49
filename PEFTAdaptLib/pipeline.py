"""File-to-file adaptation and prediction: the path the CLI, the background worker and the Slicer Logic share."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .adapters import load_adapters, save_adapters
from .data.cases import Case, load_case
from .data.io import write_image
from .data.transforms import to_array
from .errors import InputError
from .inference import predict_case
from .methods import MethodConfig, apply_method
from .metrics import dice, hd95
from .models.foundation import FoundationModel
from .training import EventCallback, TrainConfig, adapt

ImagePaths = Sequence[str | Path]


@dataclass
class LabelledCase:
    images: ImagePaths  # one path per input channel
    label: str | Path


@dataclass
class AdaptationResult:
    trainable: int
    total: int
    summary: dict
    adapter_dir: Path
    predictions: list[Path] = field(default_factory=list)


def load_labelled(cases: Sequence[LabelledCase], model: FoundationModel) -> list[Case]:
    return [load_case(c.images, model.card, c.label, model.locate) for c in cases]


def adapt_files(
    model: FoundationModel,
    support: Sequence[LabelledCase],
    audit: Sequence[LabelledCase],
    method: MethodConfig,
    train: TrainConfig,
    output_dir: str | Path,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptationResult:
    """Validate inputs, add the method's adapters, train, and save the best audited adapter to output_dir/adapter."""
    if not support:
        raise InputError("no support (training) case given; at least one labelled volume is needed")
    if not audit:
        raise InputError("no audit case given; one labelled volume is held out to measure Dice during adaptation")
    support_cases = load_labelled(support, model)
    audit_cases = load_labelled(audit, model)
    trainable = apply_method(model.network, method)
    summary = adapt(model.network, model.card, support_cases, audit_cases, train, on_event, should_stop)
    adapter_dir = save_adapters(
        model.network, Path(output_dir) / "adapter", model.base_fingerprint,
        {"model": model.card.id, "method": method.name, "rank": method.rank, "best_audit_dice": summary["best_dice"],
         "best_step": summary["best_step"], "steps": train.steps, "seed": train.seed},
    )
    return AdaptationResult(trainable, model.num_parameters(), summary, adapter_dir)


def predict_file(
    model: FoundationModel, images: ImagePaths, output_path: str | Path, device: str = "cpu"
) -> tuple[Path, sitk.Image]:
    """Segment one volume and write the label map with the input image's geometry."""
    case = load_case(images, model.card, locate=model.locate)
    _, label = predict_case(model.network, case, model.card, device)
    return write_image(label, output_path), label


def with_adapter(model: FoundationModel, adapter_dir: str | Path | None) -> FoundationModel:
    if adapter_dir is not None:
        load_adapters(model.network, adapter_dir, model.base_fingerprint)
    return model


def evaluate(prediction: sitk.Image, reference: sitk.Image, foreground: Sequence[int]) -> dict[str, float]:
    """Dice and HD95 (mm) of the union of foreground classes, on the user's grid."""
    p, r = np.isin(to_array(prediction), foreground), np.isin(to_array(reference), foreground)
    return {"dice": dice(p, r), "hd95": hd95(p, r, prediction.GetSpacing())}
