"""Real files through the real default model: geometry round-trips, a few-step adaptation, the demo path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss

from conftest import shared
from PEFTAdaptLib.data.cases import load_case
from PEFTAdaptLib.data.io import read_image, same_geometry
from PEFTAdaptLib.data.transforms import to_array
from PEFTAdaptLib.adapters import LoRAConfig, apply_adapter, load_adapters
from PEFTAdaptLib.pipeline import predict_file
from PEFTAdaptLib.training import PatchSampler, TrainConfig, adapt


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_prediction_file_keeps_the_input_geometry(deepbet, tmp_path, suffix):
    source = shared("meshnet/t1_crop.nii.gz")  # real T1, oblique direction cosines
    path, _ = predict_file(deepbet, [source], tmp_path / f"mask{suffix}")
    written, original = sitk.ReadImage(str(path)), sitk.ReadImage(str(source))
    assert written.GetSize() == original.GetSize()
    assert np.allclose(written.GetSpacing(), original.GetSpacing())
    assert np.allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    # a brain mask of an adult head: about 1.0–1.8 litres at 1 mm³ voxels, one connected blob
    mask = sitk.GetArrayFromImage(written) == 1
    assert 0.9e6 < mask.sum() < 2.0e6
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}


def test_few_step_adaptation_lowers_the_training_loss(deepbet):
    brats = "brats/brats_2013_pat0003_1"
    case = load_case([shared(f"{brats}/T1c_subtrMeanDivStd.nii.gz")], deepbet.card, shared(f"{brats}/brainmask.nii.gz"))
    apply_adapter(deepbet.network, LoRAConfig(r=4, alpha=4), "lora")
    image, label = PatchSampler([case], deepbet.card.patch_size, 2, 0.5, seed=3)()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def fixed_batch_loss() -> float:
        deepbet.network.eval()
        with torch.no_grad():
            return float(loss_fn(deepbet.network(image), label))

    before = fixed_batch_loss()
    summary = adapt(deepbet.network, deepbet.card, [case], [case], TrainConfig(steps=8, lr=3e-3, patches_per_step=2,
                                                                                  audit_every=100, seed=3))
    after = fixed_batch_loss()
    assert len(summary["losses"]) == 8 and all(np.isfinite(summary["losses"]))
    assert after < before
    assert summary["history"][0][0] == 0 and summary["history"][-1][0] == 8


def test_the_sampler_cuts_the_patches_monai_cuts_from_the_case_arrays():
    """The sampler holds each case once as a tensor (MONAI copied a NumPy case whole at every draw); the patches, and
    so every seeded run and its resume, are those MONAI cuts from the arrays themselves."""
    from monai.transforms import RandCropByPosNegLabeld

    from PEFTAdaptLib.data.cases import Case

    rng = np.random.default_rng(0)
    label = np.zeros((1, 24, 20, 16), np.uint8)
    label[0, 6:14, 5:12, 4:9] = 1
    case = Case("toy", None, None, rng.normal(size=(1, 24, 20, 16)).astype(np.float32), label)
    sampler = PatchSampler([case], (8, 8, 8), 3, 0.5, seed=4)
    reference = RandCropByPosNegLabeld(("image", "label"), "label", [8, 8, 8], pos=0.5, neg=0.5, num_samples=3)
    reference.set_random_state(seed=4)
    for _ in range(3):
        image, patch_label = sampler()
        expected = reference({"image": case.array, "label": case.label})
        assert torch.equal(image, torch.stack([torch.as_tensor(np.asarray(s["image"])) for s in expected]))
        assert torch.equal(patch_label, torch.stack([torch.as_tensor(np.asarray(s["label"])) for s in expected]).long())
        assert type(image) is torch.Tensor and image.device.type == "cpu"


def test_training_cases_are_held_on_the_gpu_only_where_they_fit_beside_the_network(monkeypatch):
    """Many large volumes stay in host memory (their patches are copied over) rather than starve the network of GPU
    memory. CUDA cannot exist here: its free-memory query is faked; CPU and MPS training hold them on the host."""
    from PEFTAdaptLib.training import CASES_SHARE_OF_GPU, case_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4000, 8000))
    gpu, host = torch.device("cuda"), torch.device("cpu")
    assert case_device(int(4000 * CASES_SHARE_OF_GPU), gpu) == gpu
    assert case_device(int(4000 * CASES_SHARE_OF_GPU) + 1, gpu) == host
    assert case_device(1, host) == host and case_device(1, torch.device("mps")) == host


def test_demo_writes_a_reloadable_adapter_and_a_prediction_on_the_input_grid(tmp_path):
    from PEFTAdaptLib.demo import format_table, run_demo
    from PEFTAdaptLib.models.deepbet import load_deepbet

    result = run_demo(tmp_path, steps=2)
    test_image = read_image(tmp_path / "data" / "test_t2like.nii.gz")
    adapted = read_image(tmp_path / "job" / "predictions" / "test_t2like_seg.nii.gz", what="label")
    assert same_geometry(adapted, test_image)
    for name in ("dice_curve.png", "overlay.png", "job/adapter/adapter.safetensors"):
        assert (tmp_path / name).stat().st_size > 1000
    meta = json.loads((tmp_path / "job" / "adapter" / "adapter.json").read_text())
    assert meta["metadata"]["model"] == "deepbet-brain" and meta["metadata"]["method"]["name"] == "sea-peft"
    active = [u for u in meta["units"] if u["active"]]
    assert active and all(u["name"].startswith("sea_") for u in active)  # the product's default method's units
    assert 0 < result["trainable"] <= 0.01 * result["total"]  # within SEA-PEFT's default budget of 1 %
    table = format_table(result)
    assert "zero-shot deepbet" in table and "adapted (sea-peft)" in table
    # where the adapters went, once an adapted state is kept; none is shown as delivered when the source is kept
    kept = result["best_step"] > 0
    assert ("active adapter units" in table and "by module: " in table) == kept
    assert ("trained but not kept" in table) == (not kept)
    assert "result: " in table  # the selection rule's verdict (2 steps: the source model is kept, and it says so)
    # the saved adapter reloads onto a fresh model and reproduces the adapted prediction exactly
    fresh = load_deepbet()
    load_adapters(fresh.network, tmp_path / "job" / "adapter", fresh.base_fingerprint)
    _, again = predict_file(fresh, [tmp_path / "data" / "test_t2like.nii.gz"], tmp_path / "again.nii.gz")
    assert np.array_equal(to_array(again), to_array(adapted))
