"""Image file types by name (no image library needed: the job client and the panels use it before torch exists)."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import takewhile
from pathlib import Path

from ..errors import InputError

#: longest first, so `.nii.gz` is recognised before `.nii`
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".png", ".tiff", ".tif", ".dcm")
MGH_SUFFIXES = (".mgz", ".mgh")  # FreeSurfer's, read and written through nibabel
#: formats whose readers do not notice truncation or NaN: checked against their header first (`integrity.py`)
CHECKED_AGAINST_HEADER = (".nii.gz", ".nii", *MGH_SUFFIXES)
#: inputs whose label is written in another format: a label map is no DICOM image (DICOM SEG is a format of its own)
LABEL_SUFFIX = {".dcm": ".nrrd"}
#: what a label map is written as
LABEL_MAP_SUFFIXES = tuple(s for s in SUFFIXES if s not in LABEL_SUFFIX)
#: predictions whose float maps (uncertainty, disagreement) are written in another format: PNG holds integers only
MAP_SUFFIX = {".png": ".nrrd"}


def image_suffix(path: str | Path, offered: Sequence[str] = SUFFIXES) -> str:
    """The image suffix of `path` (lower case), or an error naming the file and the types it may have (`offered`:
    those we read, or those a label map is written as)."""
    name = str(path).lower()
    suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise InputError(f"{path}: unsupported file type; use one of {', '.join(offered)}")
    return suffix


def stem(path: str | Path) -> str:
    """The file name without its image suffix (`t1.nii.gz` → `t1`)."""
    name = Path(path).name
    return name[: len(name) - len(image_suffix(name))]


def distinct_names(paths: Sequence[str | Path], taken: Collection[str] = ()) -> dict[str, str]:
    """Each file's `stem`, told apart from other files of that name by the nearest folder that differs between them
    (`pat3/t1.nii.gz`, `pat4/t1.nii.gz` → `pat3_t1`, `pat4_t1`; `bert/mri/norm.mgz` → `bert_norm`), else by its path
    below their common folder: a case's predictions and warnings are named after it. A stem that a name `taken`
    already holds, alone or so told apart (a re-adapt's earlier cases), is told apart by its nearest folder too."""
    files = {str(p): Path(p).expanduser().absolute() for p in paths}
    groups: dict[str, set[Path]] = {}
    for file in files.values():
        groups.setdefault(stem(file), set()).add(file)
    names = {}
    for given, file in files.items():
        group, name = sorted(groups[stem(file)]), stem(file)
        if len(group) > 1 or any(t == name or t.endswith(f"_{name}") for t in taken):
            depth = next((d for d in range(min(len(g.parents) for g in group) - 1)
                          if len({g.parents[d].name for g in group}) == len(group)), None)
            if depth is not None:
                name = f"{file.parents[depth].name}_{name}"
            else:
                common = Path(*[parts[0] for parts in takewhile(lambda parts: len(set(parts)) == 1,
                                                                zip(*(g.parts for g in group)))])
                name = "_".join(file.relative_to(common).parent.parts + (name,))
        names[given] = name
    return names


def prediction_name(name: str, image: str | Path, taken: set[str]) -> str:
    """`<case name>_seg<the input's label suffix>`, made unique among `taken` (the names given already)."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "prediction"
    unique, index = f"{base}_seg", 1
    while unique in taken:
        index += 1
        unique = f"{base}_seg{index}"
    taken.add(unique)
    return unique + label_suffix(image)


def map_suffix(path: str | Path) -> str:
    """The suffix a float map beside the segmentation `path` is written with (the segmentation's own, PNG's as NRRD)."""
    suffix = image_suffix(path)
    return MAP_SUFFIX.get(suffix, suffix)


def label_suffix(path: str | Path) -> str:
    """The suffix a label map drawn on the image `path` is written with (the image's own, DICOM's as NRRD)."""
    suffix = image_suffix(path)
    return LABEL_SUFFIX.get(suffix, suffix)
