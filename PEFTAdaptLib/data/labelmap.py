"""Label files in another numbering (FreeSurfer's aseg, another model's classes) mapped onto a model's classes by a
map the user writes, before a job is made: the job then holds labels in the model's own numbering.

The map is a JSON object from the model's class names (or class numbers) to the values that stand for each class in
the user's files, e.g. `{"White Matter": [2, 41], "Grey Matter": [3, 42, "1000-2999"], "Brain-Stem": 16}` (a
string is a run of values, both ends included; one value needs no list); a value it does not list is background.
It is untrusted input: anything else is one line naming the file and the entry.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..models.card import ModelCard
from .io import check_integer, check_on_grid, read_image, write_image


#: a run of values in a map entry, e.g. FreeSurfer's cortical parcels "1000-2999" (both ends included)
RANGE = re.compile(r"(\d+)-(\d+)")
#: a label map names a few hundred values at most; a larger file is no label map (and is not read whole)
MAX_LABEL_MAP_BYTES = 1 << 20


def _classes(card: ModelCard | dict) -> tuple[str, dict[int, str]]:
    """The model's id and its class names by value, from its card or the card as the panels hold it (JSON)."""
    if isinstance(card, ModelCard):
        return card.id, {label.value: label.name for label in card.labels}
    return card["id"], {int(label["value"]): label["name"] for label in card["labels"]}


def read_label_map(path: str | Path, card: ModelCard | dict) -> list[tuple[int, int, int]]:
    """The map file as (first value, last value, class of the model) runs; refused in one line when it is not such
    a map for this model."""
    path = Path(path)
    model, names = _classes(card)
    classes = {name.casefold(): value for value, name in names.items()}
    classes.update({str(value): value for value in names})
    runs = []
    for name, values in _entries(path).items():
        if name.casefold() not in classes:
            raise InputError(f"{path}: '{name}' is not a class of model '{model}' (its classes: "
                             f"{', '.join(names.values())})")
        runs += [(low, high, classes[name.casefold()]) for low, high in values]
    runs.sort()
    for index, (low, _, cls) in enumerate(runs):  # an earlier run (starting no later) reaching this one's start
        if any(high >= low and other != cls for _, high, other in runs[:index]):
            raise InputError(f"{path}: value {low} is listed for two classes")
    return runs


def is_label_map_file(path: str | Path) -> bool:
    """Whether the file is a label map for some model (a JSON file of a data folder may be anything else)."""
    try:
        _entries(Path(path))
    except InputError:
        return False
    return True


def _entries(path: Path) -> dict[str, list[tuple[int, int]]]:
    """The map's class names and the runs of values each stands for, as written; whether the names are the model's
    is read_label_map's to say."""
    try:
        if path.stat().st_size > MAX_LABEL_MAP_BYTES:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes is too large for a label map (at most "
                             f"{MAX_LABEL_MAP_BYTES:,})")
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the label map ({exc}); it is a JSON object such as "
                         '{"White Matter": [2, 41]}') from None
    if not isinstance(entries, dict) or not entries:
        raise InputError(f'{path}: a label map is a JSON object from class names to values, e.g. {{"White Matter": '
                         "[2, 41]}")
    parsed = {}
    for name, values in entries.items():
        parsed[name] = [_run(v) for v in (values if isinstance(values, list) else [values])]
        if not parsed[name] or None in parsed[name]:
            raise InputError(f"{path}: '{name}' must give the values that stand for it: whole numbers from 0, or "
                             'runs such as "1000-2999", e.g. [3, 42, "1000-2999"] or 16')
    return parsed


def _run(value) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, value
    match = RANGE.fullmatch(value) if isinstance(value, str) else None
    return (int(match[1]), int(match[2])) if match and int(match[1]) <= int(match[2]) else None


def describe_label_map(runs: list[tuple[int, int, int]], card: ModelCard | dict) -> str:
    """What the map does, in one line: each class and its values, then the rest."""
    names = _classes(card)[1]
    said = lambda low, high: str(low) if low == high else f"{low}-{high}"  # noqa: E731
    parts = [f"{names[c]} ← {', '.join(said(low, high) for low, high, k in runs if k == c)}"
             for c in sorted({c for _, _, c in runs})]
    return "; ".join(parts) + "; any other value → background"


def relabel(path: str | Path, image_path: str | Path, runs: list[tuple[int, int, int]], map_path: str | Path,
            output: Path) -> Path:
    """The label file at `path` in the model's numbering, written to `output` on the same grid; checked here, where
    the user's file names can still be said: on its image's grid, and with a voxel the map gives a foreground class
    (else the job would have no structure to learn)."""
    label = read_image(path, what="label")
    check_on_grid(label, path, read_image(image_path), image_path)
    values = sitk.GetArrayViewFromImage(label)
    check_integer(values, path)
    mapped = np.zeros(values.shape, np.uint8)
    for low, high, cls in runs:
        mapped[(values >= low) & (values <= high)] = cls
    if not mapped.any():
        raise InputError(f"{path}: no voxel holds a value that {map_path} gives a class other than background")
    image = sitk.GetImageFromArray(mapped)
    image.CopyInformation(label)
    return write_image(image, output)
