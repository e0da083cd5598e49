"""A model folder's files must be its own.

Whoever supplies a model folder controls every byte in it, links included: a link (or a registry path) leading out
of the folder would make listing or loading read, hash or unpickle a file they chose anywhere on the machine. Every
file a loader opens is therefore required to resolve inside the resolved model folder; the folder itself may be a
link (a site linking a large model into its model folder).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError


def inside(folder: Path, path: Path) -> Path:
    """`path` resolved, if it lies inside `folder` (resolved); else a one-line refusal naming the path and target."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target != root and root not in target.parents:
        raise ModelError(f"{path}: refused: it leads to {target}, outside the model folder {root}; copy the file "
                         "into the folder instead of linking it")
    return target


def refuse_outside_links(folder: Path) -> None:
    """Every link under `folder` (files and sub-folders, checked without being followed) must lead inside it."""
    root = Path(folder).resolve()
    for parent, folders, files in os.walk(root):  # linked sub-folders are listed, never walked into
        for name in folders + files:
            entry = Path(parent) / name
            if entry.is_symlink():
                inside(root, entry)
