"""A real 2D model and real 2D files for the 2D tests: a small MONAI UNet trained for a few seconds on axial FLAIR
slices of the shared BraTS patients (whole tumour), written as a MONAI bundle with a 2D card; and axial slices of
the patients' T1c (a contrast shift) as the files a user brings: PNG, TIFF and single-slice volumes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from conftest import shared

NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
           "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
SPACING, PATCH, ROI = [2.0, 2.0], [48, 48], [64, 64]


def brats_slice(patient: int, contrast: str) -> tuple[sitk.Image, sitk.Image]:
    """The axial slice through the middle of the tumour: (image, whole-tumour label) as 2D images (1 mm)."""
    folder = f"brats/brats_2013_pat000{patient}_1"
    image = sitk.ReadImage(str(shared(f"{folder}/{contrast}_subtrMeanDivStd.nii.gz")), sitk.sitkFloat32)
    label = sitk.ReadImage(str(shared(f"{folder}/OTMultiClass.nii.gz")))
    tumour = sitk.GetArrayViewFromImage(label) > 0
    z = int(np.median(np.nonzero(tumour.any(axis=(1, 2)))[0]))
    return image[:, :, z], sitk.Cast(label[:, :, z] > 0, sitk.sitkUInt8)


def as_png(image: sitk.Image, path: Path) -> Path:
    """An 8-bit PNG of a slice (grey values rescaled, as a screenshot or an exported radiograph holds them)."""
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image, 0, 255), sitk.sitkUInt8), str(path))
    return path


def as_single_slice(image: sitk.Image, path: Path, origin=(-12.0, 30.0, 41.5), spacing=(0.9, 0.9, 3.0)) -> Path:
    """The slice as a 3D volume of one slice, with a geometry of its own (as Slicer exports a single slice)."""
    volume = sitk.JoinSeries(image)
    volume.SetOrigin(origin)
    volume.SetSpacing(spacing)
    sitk.WriteImage(volume, str(path))
    return path


def train_bundle(folder: Path, steps: int = 60, seed: int = 0) -> Path:
    """Train the 2D UNet on FLAIR slices of patients 4 and 5 and write it as a MONAI bundle."""
    from PEFTAdaptLib.data.cases import prepare_case
    from PEFTAdaptLib.models.monai_bundle import bundle_card

    write_configs(folder, NETWORK, SPACING, ROI, PATCH, {
        "name": "brats-2d-test", "version": "1", "license": "CC BY-NC-SA 3.0 data",
        "network_data_format": {"inputs": {"image": {"modality": "MR", "num_channels": 1}},
                                "outputs": {"pred": {"channel_def": {"0": "background", "1": "whole tumour"}}}}})
    card = bundle_card(folder)
    cases = [prepare_case(f"pat{p}", [image], card, label)
             for p, (image, label) in ((p, brats_slice(p, "Flair")) for p in (4, 5))]
    return train_weights(folder, NETWORK, cases, PATCH, 4, steps, seed)


def train_weights(folder: Path, network: dict, cases: list, patch: list, batch: int, steps: int, seed: int) -> Path:
    """Train the bundle's MONAI network (`network`: its `network_def`) on `cases` and write its weights."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from safetensors.torch import save_file

    from PEFTAdaptLib.training import PatchSampler

    torch.manual_seed(seed)
    model = UNet(**{k: v for k, v in network.items() if k != "_target_"})
    sampler = PatchSampler(cases, patch, batch, 0.5, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(steps):
        image, label = sampler()
        loss = loss_fn(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (folder / "models").mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "models" / "model.safetensors"))
    return folder


def write_configs(folder: Path, network: dict, spacing: list, roi: list, patch: list, metadata: dict) -> None:
    """A MONAI bundle's configs: the network, resampling to `spacing`, z-scoring per channel, its ROI and patch."""
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    inference = {"network_def": network, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi},
                 "preprocessing": {"_target_": "Compose", "transforms": [
                     {"_target_": "Spacingd", "keys": "image", "pixdim": spacing},
                     {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}]}}
    train = {"train": {"preprocessing": [{"_target_": "RandSpatialCropd", "keys": "image", "roi_size": patch}]}}
    for name, content in (("inference", inference), ("train", train), ("metadata", metadata)):
        (folder / "configs" / f"{name}.json").write_text(json.dumps(content))
