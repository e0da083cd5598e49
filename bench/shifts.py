"""The real domain shifts of the allocation benchmark: data, model cards and source networks.

- `brats`: BraTS 2013 glioma, whole tumour (OTMultiClass > 0). Source: a MONAI UNet trained on FLAIR of the four
  shared patients (`train_source.py`, as issue #4 specifies); target: T1c of the same patients — a pure contrast
  shift (same tumours; the source has seen each tumour in FLAIR, which the test inherits: it measures how much of
  a known tumour an adapted model recovers from the new contrast, not generalisation to new patients). Support =
  T1c of patient 3, audit = patient 4, test = patients 5 and 6. 2 mm grid; intensities are the files' brain
  z-scores, set to 0 outside the brain mask (the files use a different constant per case there).
- `spine`: spinal cord. Source: a MONAI UNet trained on the T2 volume of subject A (`spine/t2`); target: T1.
  Subject A's T1 (`spine/t1`, 77 mm of cord) is cut into three 25 mm slabs along the cord: support = upper slab,
  audit = middle slab; test = lower slab + the T1w of a second subject from another site (`ivadomed/spine_unf01`,
  seen by no model in any contrast; central 64 × 64 mm in-plane crop, like subject A's field of view). 1 mm grid,
  percentile z-score.
- `spine-t2s`: the same source model on T2* (the check shift of the SEA-PEFT development, chosen on `spine` only).
  Subject A's T2* (`spine/t2s`: 9 axial slices of 7.5 mm, 0.5 mm in plane) cut into three slabs of 3 slices
  (22.5 mm) along the cord, in the order of the T1 slabs: support, audit, test; test also has subject B's T2*w
  (`ivadomed/spine_unf01`, central 64 × 64 mm). Subject A's in-plane field of view (25 × 27 mm) is smaller than the
  card's 32 × 32 patch and the trainer does not pad patches yet (issue 18: the UNet's skips then fail to match), so
  subject A's slabs are padded on the model grid, after normalisation, with their minimum to the patch size.
- `deepbet`: the real pretrained deepbet brain-extraction network on its demo shift (T2-like contrast, bias field,
  noise, motion: `PEFTAdaptLib.demo_data.shifted_case`), support seed 1, audit seed 2, test seeds 3 and 4.

Nothing is copied out of `../shared/data`; every case is built in memory.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from torch import nn

from PEFTAdaptLib.data.cases import Case, prepare_case
from PEFTAdaptLib.models.card import LabelInfo, ModelCard

#: ../shared/data beside the repository; PEFTADAPT_DATA points elsewhere (e.g. a copy on a lent GPU machine)
DATA = Path(os.environ.get("PEFTADAPT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
CACHE = Path(__file__).resolve().parent / ".cache"


def data(relative: str) -> Path:
    path = (DATA / relative).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: the benchmark reads real data from ../shared/data beside the repository")
    return path


def _card(task: str, spacing, normalization: dict, patch, roi, divisible: int, name: str) -> ModelCard:
    return ModelCard(
        id=f"bench-{task}", title=f"benchmark source model ({task})", description="trained by bench/train_source.py",
        modality="MR", input_channels=1, spacing=spacing, orientation="RAS", normalization=normalization,
        patch_size=patch, inference_roi=roi, labels=[LabelInfo(0, "background"), LabelInfo(1, name)],
        license="CC BY-NC-SA 3.0 data" if task == "brats" else "MIT data", source="bench/train_source.py",
        divisible_by=divisible,
    )


CARDS = {
    "brats": _card("brats", (2.0, 2.0, 2.0), {"name": "none"}, (64, 64, 64), (96, 96, 96), 16, "whole tumour"),
    "spine": _card("spine", (1.0, 1.0, 1.0), {"name": "percentile_zscore", "p_low": 0.5, "p_high": 99.5},
                   (32, 32, 16), (64, 64, 32), 8, "spinal cord"),
}


def unet(task: str) -> nn.Module:
    """The source architecture: MONAI's UNet (16–256 channels, 2 residual units, instance norm, 4.8 M
    parameters); the spine variant keeps the last level at 1/8 resolution (cord volumes are 16 slices thin)."""
    from monai.networks.nets import UNet

    strides = (2, 2, 2, 2) if task == "brats" else (2, 2, 2, 1)
    return UNet(3, 1, 2, (16, 32, 64, 128, 256), strides, num_res_units=2)


# -- BraTS --------------------------------------------------------------------------------------------------------
def brats_case(patient: int, contrast: str) -> Case:
    folder = data(f"brats/brats_2013_pat000{patient}_1")
    image = sitk.ReadImage(str(folder / f"{contrast}_subtrMeanDivStd.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(folder / "brainmask.nii.gz")) > 0
    image = sitk.Mask(image, sitk.Cast(brain, sitk.sitkUInt8), 0.0)
    label = sitk.Cast(sitk.ReadImage(str(folder / "OTMultiClass.nii.gz")) > 0, sitk.sitkUInt8)
    label.CopyInformation(image)
    return prepare_case(f"pat{patient}_{contrast}", [image], CARDS["brats"], label)


# -- spinal cord --------------------------------------------------------------------------------------------------
def _read_pair(image_path: str, label_path: str) -> tuple[sitk.Image, sitk.Image]:
    image = sitk.ReadImage(str(data(image_path)), sitk.sitkFloat32)
    label = sitk.Cast(sitk.ReadImage(str(data(label_path))) > 0.5, sitk.sitkUInt8)
    label.CopyInformation(image)
    return image, label


def spine_case(image: sitk.Image, label: sitk.Image, name: str, z: tuple[int, int] | None = None) -> Case:
    if z is not None:  # a slab along the cord (the third, superior axis of this RAS volume)
        image, label = image[:, :, z[0]:z[1]], label[:, :, z[0]:z[1]]
    return prepare_case(name, [image], CARDS["spine"], label)


def _central(image: sitk.Image, label: sitk.Image, size: int = 64) -> tuple[sitk.Image, sitk.Image]:
    """The central size × size in-plane field of view (subject B's scans cover the whole neck; subject A's
    cover about 60 mm around the cord): the crop is centred on the image, not on the label."""
    nx, ny, _ = image.GetSize()
    x0, y0 = (nx - size) // 2, (ny - size) // 2
    return image[x0:x0 + size, y0:y0 + size, :], label[x0:x0 + size, y0:y0 + size, :]


SPINE_SLABS = {"support": (0, 25), "audit": (26, 51), "test": (52, 77)}


def spine_source_cases() -> list[Case]:
    return [spine_case(*_read_pair("spine/t2/t2.nii.gz", "spine/t2/t2_seg-manual.nii.gz"), "A_t2")]


def spine_target_cases() -> dict[str, list[Case]]:
    t1 = _read_pair("spine/t1/t1w.nii.gz", "spine/t1/t1w_seg-manual.nii.gz")
    other = _central(*_read_pair("ivadomed/spine_unf01/sub-unf01_T1w.nii.gz",
                                 "ivadomed/spine_unf01/sub-unf01_T1w_seg-manual.nii.gz"))
    return {
        "support": [spine_case(*t1, "A_t1_upper", SPINE_SLABS["support"])],
        "audit": [spine_case(*t1, "A_t1_middle", SPINE_SLABS["audit"])],
        "test": [spine_case(*t1, "A_t1_lower", SPINE_SLABS["test"]), spine_case(*other, "B_t1")],
    }


SPINE_T2S_SLABS = {"support": (0, 3), "audit": (3, 6), "test": (6, 9)}


def _padded_to_patch(case: Case, patch) -> Case:
    """The case on a model grid grown (symmetrically, with the normalised minimum; label 0) to at least `patch`."""
    lower = [max(0, p - n) // 2 for p, n in zip(patch, case.array.shape[1:])]
    upper = [max(0, p - n) - low for p, n, low in zip(patch, case.array.shape[1:], lower)]
    widths = [(0, 0)] + list(zip(lower, upper))
    array = np.pad(case.array, widths, constant_values=float(case.array.min()))
    label = np.pad(case.label, widths)
    model_image = sitk.ConstantPad(case.model_image, lower, upper, float(case.array.min()))
    return Case(case.name, case.image, model_image, array, label, case.label_image)


def spine_t2s_target_cases() -> dict[str, list[Case]]:
    t2s = _read_pair("spine/t2s/t2s.nii.gz", "spine/t2s/t2s_seg.nii.gz")
    other = _central(*_read_pair("ivadomed/spine_unf01/sub-unf01_T2star.nii.gz",
                                 "ivadomed/spine_unf01/sub-unf01_T2star_seg-manual.nii.gz"))
    patch = CARDS["spine"].patch_size

    def slab(name: str, part: str) -> Case:
        return _padded_to_patch(spine_case(*t2s, name, SPINE_T2S_SLABS[part]), patch)

    return {"support": [slab("A_t2s_upper", "support")], "audit": [slab("A_t2s_middle", "audit")],
            "test": [slab("A_t2s_lower", "test"), spine_case(*other, "B_t2s")]}


# -- shifts -------------------------------------------------------------------------------------------------------
@dataclass
class Shift:
    name: str
    title: str
    card: ModelCard
    make_network: Callable[[], nn.Module]  # a fresh copy of the pretrained source network
    support: list[Case]
    audit: list[Case]
    test: list[Case]
    total_parameters: int = 0
    notes: list[str] = field(default_factory=list)


def brats_shift(device: str = "cpu") -> Shift:
    from train_source import load_source

    source = load_source("brats", device)
    cases = {p: brats_case(p, "T1c") for p in (3, 4, 5, 6)}
    return Shift("brats", "BraTS FLAIR → T1c, whole tumour", CARDS["brats"], lambda: copy.deepcopy(source),
                 [cases[3]], [cases[4]], [cases[5], cases[6]], sum(p.numel() for p in source.parameters()))


def _spine_shift(name: str, title: str, cases: dict[str, list[Case]], device: str) -> Shift:
    from train_source import load_source

    source = load_source("spine", device)
    return Shift(name, title, CARDS["spine"], lambda: copy.deepcopy(source), cases["support"], cases["audit"],
                 cases["test"], sum(p.numel() for p in source.parameters()))


def spine_shift(device: str = "cpu") -> Shift:
    return _spine_shift("spine", "spinal cord T2 → T1", spine_target_cases(), device)


def spine_t2s_shift(device: str = "cpu") -> Shift:
    return _spine_shift("spine-t2s", "spinal cord T2 → T2*", spine_t2s_target_cases(), device)


def deepbet_shift(device: str = "cpu") -> Shift:
    from PEFTAdaptLib.demo_data import shifted_case
    from PEFTAdaptLib.models.deepbet import load_deepbet

    model = load_deepbet()

    def case(seed: int, name: str) -> Case:
        image, mask = shifted_case(seed)
        return prepare_case(name, [image], model.card, mask, model.locate)

    pristine = copy.deepcopy(model.network)
    return Shift("deepbet", "deepbet (real pretrained) → T2-like demo shift", model.card,
                 lambda: copy.deepcopy(pristine), [case(1, "support")], [case(2, "audit")],
                 [case(3, "test3"), case(4, "test4")], model.num_parameters())


SHIFTS = {"brats": brats_shift, "spine": spine_shift, "spine-t2s": spine_t2s_shift, "deepbet": deepbet_shift}


def foreground_fraction(case: Case) -> float:
    return float(np.mean(case.label > 0))
