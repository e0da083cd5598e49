"""The benchmark's real domain shifts, as the files a user would have: images and reference labels written once
under `bench/.cache/cases/<shift>/`, a source model folder the CLI loads, and which cases play which role.

- `spine-t1`: spinal cord, MONAI UNet trained on subject A's T2 (`train_source.py`) → T1. Subject A's T1 (77 mm of
  cord) is cut into three 25 mm slabs along the cord: support = upper, audit = middle; test = lower slab + the T1w
  of a second subject from another site (`ivadomed/spine_unf01`, central 64 × 64 mm in-plane crop, like subject
  A's field of view), seen by no model in any contrast. 1 mm grid, percentile z-score.
- `spine-t2s`: the same source → T2* (subject A: nine 7.5 mm axial slices, cut into three slabs of three; test =
  lower slab + subject B's T2*).
- `brats-wt`: BraTS 2013 glioma, whole tumour (OTMultiClass > 0). Source: a MONAI UNet trained on FLAIR of the four
  shared patients; target: their T1c — a pure contrast shift (the source has seen each tumour in FLAIR). Support =
  patient 3, audit = patient 4, test = patients 5 and 6. 2 mm grid; the files' brain z-scores, set to 0 outside the
  brain mask (the files use a different constant per case there).
- `deepbet`: the real pretrained deepbet brain-extraction network on its demo shift (T2-like contrast, bias field,
  noise, motion: `PEFTAdaptLib.demo_data.shifted_case`): support seed 1, audit seed 2, test seeds 3 and 4.

Nothing is copied out of `../shared/data`: every case file is derived from it (crops, masks, contrast simulation)
into the ignored cache. The test cases are never used for any choice: not for training, not for selection.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

#: ../shared/data beside the repository; PEFTADAPT_DATA points elsewhere (e.g. a copy on a lent GPU machine)
DATA = Path(os.environ.get("PEFTADAPT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
CACHE = Path(__file__).resolve().parent / ".cache"
CASES = CACHE / "cases"


def data(relative: str) -> Path:
    path = (DATA / relative).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: the benchmark reads real data from ../shared/data beside the repository")
    return path


@dataclass
class CaseFiles:
    name: str
    image: str
    label: str


@dataclass
class Shift:
    name: str
    title: str
    model: str  # a model id or a model folder: what `peftadapt adapt --model` takes
    support: list[CaseFiles]
    audit: list[CaseFiles]
    test: list[CaseFiles]
    classes: dict[int, str]  # the label values scored (foreground), with their names
    notes: str = ""
    extra: dict = field(default_factory=dict)


def write_case(shift: str, name: str, image: sitk.Image, label: sitk.Image) -> CaseFiles:
    folder = CASES / shift
    folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    if not (image_path.is_file() and label_path.is_file()):
        label = sitk.Cast(label, sitk.sitkUInt8)
        label.CopyInformation(image)
        sitk.WriteImage(image, str(image_path), useCompression=True)
        sitk.WriteImage(label, str(label_path), useCompression=True)
    return CaseFiles(name, str(image_path), str(label_path))


# -- spinal cord --------------------------------------------------------------------------------------------------
def read_pair(image_path: str, label_path: str) -> tuple[sitk.Image, sitk.Image]:
    image = sitk.ReadImage(str(data(image_path)), sitk.sitkFloat32)
    label = sitk.Cast(sitk.ReadImage(str(data(label_path))) > 0.5, sitk.sitkUInt8)
    label.CopyInformation(image)
    return image, label


def central(image: sitk.Image, label: sitk.Image, size_mm: float = 64.0) -> tuple[sitk.Image, sitk.Image]:
    """The central size × size mm in-plane field of view (subject B's scans cover the whole neck; subject A's cover
    about 60 mm around the cord): the crop is centred on the image, not on the label."""
    nx, ny, _ = image.GetSize()
    sx, sy = (round(size_mm / s) for s in image.GetSpacing()[:2])
    x0, y0 = max(0, (nx - sx) // 2), max(0, (ny - sy) // 2)
    return image[x0:x0 + sx, y0:y0 + sy, :], label[x0:x0 + sx, y0:y0 + sy, :]


SPINE_CONTRASTS = {  # subject A's file, subject B's file (manual or curated cord masks), slabs along the cord
    "t1": (("spine/t1/t1w.nii.gz", "spine/t1/t1w_seg-manual.nii.gz"),
           ("ivadomed/spine_unf01/sub-unf01_T1w.nii.gz", "ivadomed/spine_unf01/sub-unf01_T1w_seg-manual.nii.gz"),
           ((0, 25), (26, 51), (52, 77))),  # 1 mm slices
    "t2s": (("spine/t2s/t2s.nii.gz", "spine/t2s/t2s_seg.nii.gz"),
            ("ivadomed/spine_unf01/sub-unf01_T2star.nii.gz",
             "ivadomed/spine_unf01/sub-unf01_T2star_seg-manual.nii.gz"),
            ((0, 3), (3, 6), (6, 9))),  # 7.5 mm slices
}


def spine_shift(contrast: str) -> Shift:
    """Subject A's three slabs along the cord (the volumes' third, superior axis): support, audit, test."""
    from train_source import source_model

    name = f"spine-{contrast}"
    subject_a, subject_b, bounds = SPINE_CONTRASTS[contrast]
    image, label = read_pair(*subject_a)
    support, audit, test = (write_case(name, f"A_{contrast}_z{a}-{b}", image[:, :, a:b], label[:, :, a:b])
                            for a, b in bounds)
    title = {"t1": "T1", "t2s": "T2*"}[contrast]
    return Shift(name, f"spinal cord T2 → {title}", str(source_model("spine")), [support], [audit],
                 [test, write_case(name, f"B_{contrast}", *central(*read_pair(*subject_b)))], {1: "spinal cord"})


# -- BraTS --------------------------------------------------------------------------------------------------------
def brats_images(patient: int, contrast: str) -> tuple[sitk.Image, sitk.Image]:
    """The contrast inside the brain mask (0 outside) and the whole-tumour mask."""
    folder = data(f"brats/brats_2013_pat000{patient}_1")
    image = sitk.ReadImage(str(folder / f"{contrast}_subtrMeanDivStd.nii.gz"), sitk.sitkFloat32)
    brain = sitk.Cast(sitk.ReadImage(str(folder / "brainmask.nii.gz")) > 0, sitk.sitkUInt8)
    label = sitk.Cast(sitk.ReadImage(str(folder / "OTMultiClass.nii.gz")) > 0, sitk.sitkUInt8)
    label.CopyInformation(image)
    return sitk.Mask(image, brain, 0.0), label


def brats_shift() -> Shift:
    from train_source import source_model

    cases = {p: write_case("brats-wt", f"pat{p}_T1c", *brats_images(p, "T1c")) for p in (3, 4, 5, 6)}
    return Shift("brats-wt", "BraTS FLAIR → T1c, whole tumour", str(source_model("brats")), [cases[3]], [cases[4]],
                 [cases[5], cases[6]], {1: "whole tumour"})


# -- deepbet ------------------------------------------------------------------------------------------------------
def deepbet_shift() -> Shift:
    from PEFTAdaptLib.demo_data import shifted_case

    case = lambda seed, name: write_case("deepbet", name, *shifted_case(seed))  # noqa: E731
    return Shift("deepbet", "deepbet (real pretrained) → T2-like demo shift", "deepbet-brain",
                 [case(1, "support")], [case(2, "audit")], [case(3, "test3"), case(4, "test4")], {1: "brain"})


SHIFTS: dict[str, Callable[[], Shift]] = {
    "spine-t1": lambda: spine_shift("t1"), "spine-t2s": lambda: spine_shift("t2s"), "brats-wt": brats_shift,
    "deepbet": deepbet_shift,
}
