"""The default foundation model: deepbet's pretrained LinkNet3d brain-extraction network, shipped in its wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelError
from .card import LabelInfo, ModelCard
from .foundation import FoundationModel
from .safe_load import sha256_file

BBOX_SHA256 = "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa"

MODEL_ID = "deepbet-brain"
#: sha256 of data/models/model.pt in deepbet 1.0.2
MODEL_SHA256 = "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd"

CARD = ModelCard(
    id=MODEL_ID,
    title="deepbet brain extraction (LinkNet3d)",
    description="Brain mask from a T1-weighted MRI. deepbet's pretrained 3D LinkNet (Fisch et al., 2024), trained on "
    "7837 T1w images from 191 datasets; about 2.1 M parameters.",
    modality="MR (T1w)",
    input_channels=1,
    spacing=None,
    orientation="RAS",
    normalization={"name": "percentile_zscore", "p_low": 0.5, "p_high": 99.5, "scale": 0.226, "shift": 0.449},
    patch_size=(128, 128, 128),
    inference_roi=(256, 256, 256),
    labels=[
        LabelInfo(0, "background", (0.0, 0.0, 0.0)),
        LabelInfo(1, "brain", (0.87, 0.68, 0.55),
                  "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
                  "~SCT^12738006^Brain~^^~Anatomic codes - DICOM master list~^^~^^"),
    ],
    license="MIT",
    source="PyPI package deepbet 1.0.2 (data/models/model.pt), https://github.com/wwu-mmll/deepbet",
    divisible_by=32,
    fit_to_roi=True,
    extra={"parameters": 2_126_258},
    citation="Fisch L. et al., deepbet: Fast brain extraction of T1-weighted MRI using Convolutional Neural Networks, "
    "Computers in Biology and Medicine 179 (2024).",
)


def deepbet_weights_path() -> Path:
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise ModelError("deepbet is not installed: `pip install deepbet` provides the default model's weights")
    path = Path(spec.origin).resolve().parents[1] / "data" / "models" / "model.pt"
    if not path.is_file():
        raise ModelError(f"{path}: deepbet's model file is missing; reinstall with `pip install --force-reinstall deepbet`")
    return path


def _verified(path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, expected {expected[:12]}…); "
                         "the file is corrupt or not deepbet 1.0.2's")
    return path


def verified_deepbet_files() -> tuple[Path, Path]:
    """(network, locator) files of the installed deepbet, checksums verified; no torch needed (model listing)."""
    path = _verified(deepbet_weights_path(), MODEL_SHA256)
    return path, _verified(path.with_name("bbox_model.pt"), BBOX_SHA256)


def load_deepbet() -> FoundationModel:
    # torch is imported here, not at module level: listing model cards must work before torch is installed
    from ..adapters.io import fingerprint
    from .deepbet_locator import DeepbetLocator
    from .linknet3d import load_from_torchscript

    path, locator_path = verified_deepbet_files()
    network = load_from_torchscript(str(path))
    return FoundationModel(network, CARD, fingerprint(network), {"weights": str(path), "locator": str(locator_path)},
                           locate=DeepbetLocator(str(locator_path)))
