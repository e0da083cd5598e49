"""A real model that takes two image channels per case, as BraTS-style tumour models do: a small 3D MONAI UNet
trained for a few seconds on the FLAIR and T1c volumes of shared BraTS patient 4 (whole tumour), written as a MONAI
bundle that names its channels (`network_data_format#inputs#image#channel_def`, as MONAI's BraTS bundle does)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from conftest import shared

CHANNELS = ("FLAIR", "T1c")
FILES = {"FLAIR": "Flair_subtrMeanDivStd.nii.gz", "T1c": "T1c_subtrMeanDivStd.nii.gz"}
NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 2, "out_channels": 2,
           "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
SPACING, PATCH, ROI = [3.0, 3.0, 3.0], [32, 32, 32], [48, 48, 48]


def brats_file(patient: int, channel: str) -> Path:
    """A channel's file ("FLAIR", "T1c") or, for "label", the whole-tumour labels' (OTMultiClass: 0 outside)."""
    name = "OTMultiClass.nii.gz" if channel == "label" else FILES[channel]
    return shared(f"brats/brats_2013_pat000{patient}_1/{name}")


def whole_tumour(patient: int, path: Path) -> Path:
    """The patient's whole-tumour label (every tumour class as 1), written to `path`."""
    label = sitk.ReadImage(str(brats_file(patient, "label")))
    sitk.WriteImage(sitk.Cast(label > 0, sitk.sitkUInt8), str(path))
    return path


def write_bundle(folder: Path, steps: int = 20, seed: int = 0) -> Path:
    from planar_model import train_weights, write_configs

    from PEFTAdaptLib.data.cases import load_case
    from PEFTAdaptLib.models.monai_bundle import bundle_card

    write_configs(folder, NETWORK, SPACING, ROI, PATCH, {
        "name": "brats-two-channel-test", "version": "1", "license": "CC BY-NC-SA 3.0 data",
        "network_data_format": {
            "inputs": {"image": {"modality": "MR", "num_channels": len(CHANNELS),
                                 "channel_def": {str(i): name for i, name in enumerate(CHANNELS)}}},
            "outputs": {"pred": {"channel_def": {"0": "background", "1": "whole tumour"}}}}})
    case = load_case([brats_file(4, channel) for channel in CHANNELS], bundle_card(folder),
                     whole_tumour(4, folder / "wt4.nii.gz"))
    return train_weights(folder, NETWORK, [case], PATCH, 2, steps, seed)
