"""The JSON files PEFTAdapt is handed (job, worker status, model card and description, adapter config) are read one
way: a missing, unreadable or non-object file is refused in one line naming the file and what it should hold."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, PEFTAdaptError


def read_json(path: str | Path, what: str, error: type[PEFTAdaptError] = InputError) -> dict:
    """The JSON object in `path`, or `error` naming the file and `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} " + ("is a folder, not a file" if path.is_dir() else "not found"))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is not a JSON object")
    return data
