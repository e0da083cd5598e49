"""File-to-file prediction and evaluation (adaptation itself runs as a job: `PEFTAdaptLib.worker`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data.cases import load_case
from .data.io import write_image
from .data.transforms import to_array
from .metrics import dice, hd95
from .models.foundation import FoundationModel
from .uncertainty import predict_with_uncertainty

ImagePaths = Sequence[str | Path]


def predict_file(
    model: FoundationModel, images: ImagePaths, output_path: str | Path, device: str = "cpu"
) -> tuple[Path, sitk.Image]:
    """Segment one volume and write the label map with the input image's geometry, its uncertainty map(s) and slice
    ranking beside it (uncertainty.py)."""
    case = load_case(images, model.card, locate=model.locate)
    label, uncertainty = predict_with_uncertainty(model.network, case, model.card, device)
    path = write_image(label, output_path)
    uncertainty.write(path, case.image)
    return path, label


def evaluate(prediction: sitk.Image, reference: sitk.Image, foreground: Sequence[int]) -> dict[str, float]:
    """Dice and HD95 (mm) of the union of foreground classes, on the user's grid."""
    p, r = np.isin(to_array(prediction), foreground), np.isin(to_array(reference), foreground)
    return {"dice": dice(p, r), "hd95": hd95(p, r, prediction.GetSpacing())}
