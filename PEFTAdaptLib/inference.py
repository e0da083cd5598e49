"""Sliding-window inference on the model's grid, and predictions written back onto the user's grid."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from .data.cases import Case
from .data.planar import on_grid_of, user_grid
from .data.transforms import probabilities_onto_grid
from .models.card import FIXED_INPUT_SIZE, ModelCard


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> tuple[torch.Tensor, tuple[slice, ...]]:
    if multiple <= 1:
        return x, tuple(slice(None) for _ in x.shape[2:])
    pads, crop = [], []
    for size in x.shape[2:]:
        extra = (-size) % multiple
        pads.append((extra // 2, extra - extra // 2))
        crop.append(slice(extra // 2, extra // 2 + size))
    flat = [p for pair in reversed(pads) for p in pair]
    return torch.nn.functional.pad(x, flat, value=value), tuple(crop)


@torch.no_grad()
def predict_probabilities(
    network: nn.Module, array: np.ndarray, card: ModelCard, device: torch.device | str = "cpu", overlap: float = 0.25
) -> np.ndarray:
    """Class probabilities (C, x, y, z) for a normalised (C_in, x, y, z) array on the model's grid (one axis less
    for a 2D model)."""
    was_training = network.training
    network.eval()
    try:
        x = torch.from_numpy(array)[None].to(device)
        background = float(x.min())  # pad with the normalised background value, not 0
        x, crop = pad_to_multiple(x, card.divisible_by, background)
        fixed = card.extra.get(FIXED_INPUT_SIZE)  # a smaller image is padded up to the ROI instead
        roi = list(card.inference_roi) if fixed else [min(r, s) for r, s in zip(card.inference_roi, x.shape[2:])]
        on_gpu = torch.device(device).type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            logits = sliding_window_inference(x, roi, 1, network, overlap=overlap, mode="gaussian", cval=background)
        probs = torch.softmax(logits.float(), dim=1)[0][(slice(None), *crop)]
        return probs.cpu().numpy()
    finally:
        network.train(was_training)


def predict_case(network: nn.Module, case: Case, card: ModelCard, device="cpu") -> tuple[np.ndarray, sitk.Image]:
    """Return (label array on the model grid, label image on the user's grid with the input's geometry)."""
    probs = predict_probabilities(network, case.array, card, device)
    return probs.argmax(0).astype(np.uint8), user_grid_prediction(probs, case, card)[2]


def user_grid_prediction(probs: np.ndarray, case: Case, card: ModelCard) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """(class probabilities on the user's grid — its plane for a 2D model —, the label values there, the label image
    with the input's geometry) from model-grid probabilities."""
    user_probs = probabilities_onto_grid(probs, case.model_image, user_grid(case.image, card.spatial_dims))
    values = np.array([label.value for label in card.labels], dtype=np.uint8)[user_probs.argmax(0)]
    return user_probs, values, on_grid_of(values, case.image)
