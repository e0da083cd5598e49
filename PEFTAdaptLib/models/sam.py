"""segment-anything (SAM) model folders: a user's SAM checkpoint as the encoder of a 2D segmentation model.

The folder holds `sam.json` and the files it names:

    {"checkpoint": "sam_vit_b_01ec64.pth",          # Meta's SAM file (its image_encoder.* tensors), or an encoder alone
     "labels": ["background", "lung"],              # or LabelInfo objects {"value", "name", "color"}
     "head": "head.safetensors",                    # optional: a trained segmentation head
     "image_size": 512,                             # optional: input size in pixels (default 1024, SAM's own)
     "spacing": [0.7, 0.7], "normalization": {"name": "minmax"}, "title": …, "modality": …, "license": …}

Only the image encoder is used (SAM's prompt encoder and mask decoder answer prompts; PEFTAdapt segments without
them, as SAMed does); a small head turns its features into class logits (`sam_network.py`). Without a `head` file
the head is new: every adaptation trains it in full beside the method's adapters (the card's `trained_in_full`),
and predictions before an adaptation mean nothing. Weights load as data (safetensors, or a weights-only pickle:
Meta's `.pth` files are plain state dicts); nothing in the folder is code.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..jsonfile import read_json
from .card import FIXED_INPUT_SIZE, TRAINED_IN_FULL, LabelInfo, ModelCard
from .foundation import FoundationModel

DESCRIPTION = "sam.json"
DEFAULT_IMAGE_SIZE = 1024
#: the segmenter's module that starts untrained when the folder has no head file
HEAD = "head"


def is_sam_folder(folder: Path) -> bool:
    return (folder / DESCRIPTION).is_file()


def read_description(folder: Path) -> dict:
    """sam.json, checked field by field (one line naming the field and the problem)."""
    path = folder / DESCRIPTION
    spec = read_json(path, "SAM model description", ModelError)
    if not isinstance(spec.get("checkpoint"), str) or not spec["checkpoint"]:
        raise ModelError(f"{path}: field 'checkpoint' must name the SAM weights file in this folder")
    for key in ("checkpoint", "head"):
        name = spec.get(key, "")
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"{path}: field '{key}' must be a file name inside the model folder, got {spec[key]!r}")
    labels = spec.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ModelError(f"{path}: field 'labels' must list at least two classes, background first")
    size = spec.get("image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ModelError(f"{path}: field 'image_size' must be a whole number of pixels (≥ 32), got {size!r}")
    spacing = spec.get("spacing")
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 2
                                    and all(isinstance(s, (int, float)) and s > 0 for s in spacing)):
        raise ModelError(f"{path}: field 'spacing' must be two positive numbers (mm) or null, got {spacing!r}")
    return spec


def _labels(spec: dict, path: Path) -> list[LabelInfo]:
    labels = []
    for value, entry in enumerate(spec["labels"]):
        if isinstance(entry, str):
            labels.append(LabelInfo(value, entry, (0.0, 0.0, 0.0) if value == 0 else (1.0, 0.0, 0.0)))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            labels.append(LabelInfo(int(entry.get("value", value)), entry["name"],
                                    tuple(entry.get("color", (1.0, 0.0, 0.0))), str(entry.get("terminology", ""))))
        else:
            raise ModelError(f"{path}: labels[{value}] must be a name or an object with a 'name'")
    return labels


def sam_card(folder: Path, model_id: str | None = None, spec: dict | None = None) -> ModelCard:
    """The card from sam.json alone (no torch); `spec`: sam.json as `read_description` returned it, if read already."""
    folder = Path(folder)
    spec = read_description(folder) if spec is None else spec
    size = spec.get("image_size", DEFAULT_IMAGE_SIZE)
    new_head = "head" not in spec
    description = spec.get("description", "segment-anything image encoder with a segmentation head")
    if new_head:
        description += " (new head: trained by every adaptation; predictions before one mean nothing)"
    return ModelCard(
        id=model_id or f"sam-{folder.name}", title=spec.get("title", f"SAM {folder.name}"), description=description,
        modality=spec.get("modality", ""), input_channels=1,
        spacing=tuple(spec["spacing"]) if spec.get("spacing") else None, orientation="",
        normalization=spec.get("normalization", {"name": "minmax"}), patch_size=(size, size),
        inference_roi=(size, size), labels=_labels(spec, folder / DESCRIPTION),
        license=spec.get("license", "Apache-2.0 (SAM weights)"), source=spec.get("source", str(folder)),
        extra={"format": "segment_anything", FIXED_INPUT_SIZE: True,
               **({TRAINED_IN_FULL: [HEAD]} if new_head else {})},
        spatial_dims=2)


def load_sam(folder: str | Path, model_id: str | None = None) -> FoundationModel:
    import torch

    from ..adapters.io import fingerprint
    from .safe_load import load_into, load_state_dict_file
    from .sam_network import PREFIX, ImageEncoderViT, SAMSegmenter, encoder_settings, resize_position_embedding

    folder = Path(folder)
    spec = read_description(folder)
    card = sam_card(folder, model_id, spec)
    weights = folder / spec["checkpoint"]
    state = load_state_dict_file(weights)
    encoder_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)} or state
    try:
        settings = encoder_settings(encoder_state)
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise ModelError(f"{weights}: not a segment-anything image encoder ({exc})") from None
    size, patch = card.patch_size[0], settings["patch_size"]
    if size % patch:
        raise ModelError(f"{folder / DESCRIPTION}: field 'image_size' {size} is not a multiple of the encoder's "
                         f"{patch}-pixel patches")
    encoder_state = resize_position_embedding(encoder_state, size // patch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a new head starts from the same weights in every job (the adapters' fingerprint)
        network = SAMSegmenter(ImageEncoderViT(**{**settings, "img_size": size}), card.num_classes)
    load_into(network.image_encoder, encoder_state, weights)
    files = {"weights": str(weights), "description": str(folder / DESCRIPTION)}
    if "head" in spec:
        head = folder / spec["head"]
        load_into(network.head, load_state_dict_file(head), head)
        files["head"] = str(head)
    network.eval()
    return FoundationModel(network, card, fingerprint(network), files)
