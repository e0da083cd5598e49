"""Shared fixtures: the real data folder beside the repository and the real default model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        raise FileNotFoundError(f"{path}: the tests read real data from ../shared/data beside the repository")
    return path


@pytest.fixture
def deepbet():
    """A fresh copy of the real pretrained default model (adapters mutate it)."""
    from PEFTAdaptLib.models.deepbet import load_deepbet

    return load_deepbet()
