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
- `brats-wt-2`, `brats-tc`, `brats-tc-2`: the same with two support volumes (patients 3 and 4; no audit volume:
  the job holds out a slab of each, as it does for a user who gives none), and for tumour core (labels 1, 3, 4:
  necrosis, non-enhancing and enhancing tumour) with a source trained on FLAIR tumour core.
- `spine-site`: the same spine source → subject B's T2w (another site, the source's contrast): support = its first 8
  slices (the job holds out an audit slab), test = its last 8.
- `meshnet-gw`: brainchop's real pretrained MeshNet grey/white model on FreeSurfer's conformed brains: adapt on
  `niivue`, test on `bert`. Labels mapped from FreeSurfer's segmentation by `freesurfer_gw.json` through the
  product's label map (what `peftadapt adapt --label-map` does): white matter = cerebral and cerebellar white
  matter, corpus callosum, white-matter hypointensities; grey matter = cerebral and cerebellar cortex (with the
  cortical parcels, 1000 and up) and the deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus,
  amygdala, accumbens, ventral diencephalon); the rest (ventricles, brainstem, CSF, vessels, choroid plexus)
  background. No audit volume: the job holds out a slab of niivue. `.mgz` in, `.mgz` out, as a FreeSurfer user
  would run it.
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


def spine_site_shift() -> Shift:
    """Subject B's T2w (another site, the source's own contrast): first 8 slices to adapt on, last 8 to test."""
    from train_source import source_model

    image, label = central(*read_pair("ivadomed/spine_unf01/sub-unf01_T2w.nii.gz",
                                      "ivadomed/spine_unf01/sub-unf01_T2w_seg-manual.nii.gz"))
    depth = image.GetSize()[2]
    half = depth // 2
    return Shift("spine-site", "spinal cord T2, subject A → subject B (another site)", str(source_model("spine")),
                 [write_case("spine-site", f"B_t2_z0-{half}", image[:, :, :half], label[:, :, :half])], [],
                 [write_case("spine-site", f"B_t2_z{half}-{depth}", image[:, :, half:], label[:, :, half:])],
                 {1: "spinal cord"})


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
BRATS_REGIONS = {"brats": (1, 2, 3, 4), "brats-tc": (1, 3, 4)}  # whole tumour; tumour core
REGION_NAMES = {"brats": "whole tumour", "brats-tc": "tumour core"}


def brats_images(patient: int, contrast: str, task: str = "brats") -> tuple[sitk.Image, sitk.Image]:
    """The contrast inside the brain mask (0 outside) and the region's mask (whole tumour or tumour core)."""
    import numpy as np

    folder = data(f"brats/brats_2013_pat000{patient}_1")
    image = sitk.ReadImage(str(folder / f"{contrast}_subtrMeanDivStd.nii.gz"), sitk.sitkFloat32)
    brain = sitk.Cast(sitk.ReadImage(str(folder / "brainmask.nii.gz")) > 0, sitk.sitkUInt8)
    classes = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "OTMultiClass.nii.gz")))
    label = sitk.GetImageFromArray(np.isin(classes, BRATS_REGIONS[task]).astype(np.uint8))
    label.CopyInformation(image)
    return sitk.Mask(image, brain, 0.0), label


def brats_shift(task: str, supports: int) -> Shift:
    """Support patient 3 and audit patient 4, or (two supports) patients 3 and 4 with held-out audit slabs."""
    from train_source import source_model

    name = ("brats-wt" if task == "brats" else task) + ("-2" if supports == 2 else "")
    cases = {p: write_case(name, f"pat{p}_T1c", *brats_images(p, "T1c", task)) for p in (3, 4, 5, 6)}
    support, audit = ([cases[3]], [cases[4]]) if supports == 1 else ([cases[3], cases[4]], [])
    return Shift(name, f"BraTS FLAIR → T1c, {REGION_NAMES[task]}, {supports} support volume(s)",
                 str(source_model(task)), support, audit, [cases[5], cases[6]], {1: REGION_NAMES[task]})


# -- FreeSurfer brains and MeshNet ----------------------------------------------------------------------------------
#: MeshNet model5_gw_ae's classes from FreeSurfer's numbering (aseg; cortical parcels of aparc / aparc.a2009s from
#: 1000): the map a user gives `peftadapt adapt --label-map`
FREESURFER_GW = Path(__file__).with_name("freesurfer_gw.json")


def freesurfer_case(shift: str, subject: str, segmentation: str) -> CaseFiles:
    """FreeSurfer's `norm.mgz` and its grey/white label, mapped from `segmentation` by the product's label map
    (`.mgz`, FreeSurfer's own format; SimpleITK cannot read it)."""
    from PEFTAdaptLib.data.labelmap import read_label_map, relabel
    from PEFTAdaptLib.models.registry import model_card

    image_path, label_path = data(f"freesurfer/{subject}/norm.mgz"), CASES / shift / f"{subject}_norm_label.mgz"
    if not label_path.is_file():
        runs = read_label_map(FREESURFER_GW, model_card(data("meshnet/model5_gw_ae")))
        relabel(data(f"freesurfer/{subject}/{segmentation}"), image_path, runs, FREESURFER_GW, label_path)
    return CaseFiles(f"{subject}_norm", str(image_path), str(label_path))


def meshnet_shift() -> Shift:
    return Shift("meshnet-gw", "MeshNet grey/white (real pretrained): FreeSurfer niivue → bert",
                 str(data("meshnet/model5_gw_ae")), [freesurfer_case("meshnet-gw", "niivue", "aparc.a2009s+aseg.mgz")],
                 [], [freesurfer_case("meshnet-gw", "bert", "aseg.mgz")], {1: "White Matter", 2: "Grey Matter"})


# -- deepbet ------------------------------------------------------------------------------------------------------
def deepbet_shift() -> Shift:
    from PEFTAdaptLib.demo_data import shifted_case

    case = lambda seed, name: write_case("deepbet", name, *shifted_case(seed))  # noqa: E731
    return Shift("deepbet", "deepbet (real pretrained) → T2-like demo shift", "deepbet-brain",
                 [case(1, "support")], [case(2, "audit")], [case(3, "test3"), case(4, "test4")], {1: "brain"})


SHIFTS: dict[str, Callable[[], Shift]] = {
    "spine-t1": lambda: spine_shift("t1"), "spine-t2s": lambda: spine_shift("t2s"), "spine-site": spine_site_shift,
    "brats-wt": lambda: brats_shift("brats", 1), "brats-wt-2": lambda: brats_shift("brats", 2),
    "brats-tc": lambda: brats_shift("brats-tc", 1), "brats-tc-2": lambda: brats_shift("brats-tc", 2),
    "meshnet-gw": meshnet_shift, "deepbet": deepbet_shift,
}
