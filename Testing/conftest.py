"""Shared fixtures: the real data folder beside the repository and the real default model."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)
# worker subprocesses sum on as many threads as pytest does, so a job run in either reproduces the other's numbers
os.environ["OMP_NUM_THREADS"] = "2"
EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's verdict once everything is reported. The interpreter's teardown of the native libraries
    (VTK through slicer-core, torch, the browser driver) crashed once with a segmentation fault after every test had
    passed and been reported, turning a green run red; by then there is nothing left to check."""
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


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


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """A 40-slice slab of the real conformed T1 and a threshold label of it: a MeshNet job on it takes seconds."""
    import numpy as np
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("thin")
    image = sitk.ReadImage(str(shared("meshnet/t1_crop.nii.gz")))[:, :, 100:140]
    label = sitk.Cast(image > float(np.percentile(sitk.GetArrayViewFromImage(image), 70)), sitk.sitkUInt8)
    label.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "thin.nii.gz"))
    sitk.WriteImage(label, str(folder / "thin_label.nii.gz"))
    return folder


@pytest.fixture(scope="session")
def two_channel_bundle(tmp_path_factory) -> Path:
    """A real two-channel (FLAIR, T1c) MONAI bundle, trained once per session (`two_channel_model.py`)."""
    from two_channel_model import write_bundle

    return write_bundle(tmp_path_factory.mktemp("two-channel") / "bundle")
