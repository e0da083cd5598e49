"""Reading fields of an untrusted model description (JSON written by whoever supplied the folder).

A field of the wrong type would otherwise surface as a library error (`int('a')`, `.get` on a list) naming neither
the file nor the field, or as a value that fails deep inside resampling or convolution. Every reader takes its
fields through these functions, which refuse in one line: "<file>: '<field>' should be …, got …".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ModelError

#: orientation letters: one of each pair, in any order (DICOM/ITK axcodes as nibabel names them)
AXIS_PAIRS = ("RL", "AP", "SI")


def refusal(where: str | Path, field: str, should: str, value: Any) -> ModelError:
    shown = repr(value)
    return ModelError(f"{where}: '{field}' should be {should}, got {shown[:60]}{'…' if len(shown) > 60 else ''}")


def unreadable(where: str | Path, exc: Exception) -> ModelError:
    """The backstop for a description a reader did not foresee: the folder's status, never an internal error."""
    return ModelError(f"{where}: cannot read the model description ({type(exc).__name__}: {exc})")


def mapping(value: Any, where: str | Path, field: str) -> dict:
    if not isinstance(value, dict):
        raise refusal(where, field, "a mapping", value)
    return value


def sequence(value: Any, where: str | Path, field: str, length: int | None = None) -> list | tuple:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise refusal(where, field, f"a list of {length} items" if length else "a list", value)
    return value


def integer(value: Any, where: str | Path, field: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """A whole number (JSON integer, or a float without fraction) within [minimum, maximum]."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = f" from {minimum}" if minimum is not None else ""
        bounds += f" to {maximum}" if maximum is not None else ""
        raise refusal(where, field, f"a whole number{bounds}", value)
    return int(value)


def number(value: Any, where: str | Path, field: str, positive: bool = False) -> float:
    """A finite number (JSON accepts a bare NaN), positive if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise refusal(where, field, "a finite positive number" if positive else "a finite number", value)
    return float(value)


def sizes(value: Any, where: str | Path, field: str, lengths: tuple[int, ...] = (2, 3)) -> tuple[int, ...]:
    """A spatial size: positive whole numbers, one per axis."""
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        raise refusal(where, field, f"{' or '.join(map(str, lengths))} positive whole numbers", value)
    return tuple(integer(v, where, f"{field}[{i}]", minimum=1) for i, v in enumerate(value))


def spacing(value: Any, where: str | Path, field: str, lengths: tuple[int, ...] = (2, 3)) -> tuple[float, ...]:
    """Voxel spacing in mm: finite positive numbers, one per axis."""
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        raise refusal(where, field, f"{' or '.join(map(str, lengths))} positive numbers (mm)", value)
    return tuple(number(v, where, f"{field}[{i}]", positive=True) for i, v in enumerate(value))


def axcodes(value: Any, where: str | Path, field: str) -> str:
    """'' (keep the image's own orientation) or three letters, one of each pair R/L, A/P, S/I."""
    if value == "":
        return value
    letters = value.upper() if isinstance(value, str) else ""
    pairs = sorted(next((p for p in AXIS_PAIRS if letter in p), letter) for letter in letters)
    if len(letters) != 3 or pairs != sorted(AXIS_PAIRS):
        raise refusal(where, field, "three letters, one each of R/L, A/P and S/I (e.g. RAS)", value)
    return letters


def class_index(key: Any, where: str | Path, field: str) -> int:
    """A class value written as a JSON key ("0", "1", …)."""
    if not (isinstance(key, str) and key.strip().isdigit()):
        raise refusal(where, f"{field} key", "a class index (0, 1, 2, …)", key)
    return int(key)


def indexed_names(value: Any, where: str | Path, field: str) -> list[str]:
    """The names of a mapping keyed by index ({"0": "FLAIR", "1": "T1c"}), in index order."""
    names = mapping(value, where, field)
    return [str(name) for _index, name in sorted((class_index(key, where, field), name) for key, name in names.items())]
