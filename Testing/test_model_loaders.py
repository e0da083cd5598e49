"""Foundation-model loaders on real model folders: MONAI bundle, nnU-Net v2, TorchScript + card, brainchop MeshNet.

Bundles and nnU-Net folders are written here exactly as MONAI and nnU-Net write them (real networks, real config
keys, `torch.save` checkpoints); the MeshNet models are brainchop's own files in ../shared/data/meshnet.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from conftest import shared
from PEFTAdaptLib.adapters import LoRAConfig, apply_adapter
from PEFTAdaptLib.cli import main
from PEFTAdaptLib.data.cases import load_case, prepare_case
from PEFTAdaptLib.errors import ModelError
from PEFTAdaptLib.inference import predict_case
from PEFTAdaptLib.models.catalog import registry_schema, validate
from PEFTAdaptLib.models.registry import list_models, load_model
from PEFTAdaptLib.models.safe_load import load_checkpoint, load_into, load_state_dict_file, sha256_file, verify_sha256
from PEFTAdaptLib.models.torchscript_card import with_adapter
from PEFTAdaptLib.models.trust import trust_file

SPLEEN_CT = "ivadomed/spleen_ct/sub-spleen2_ct.nii.gz"  # 164×166×26, 0.79×0.79×5 mm, HU


def _ct_crop() -> sitk.Image:
    """A 64×64×26 crop of the real CT around the spleen: whole-case inference stays fast on 2 CPU cores."""
    return sitk.ReadImage(str(shared(SPLEEN_CT)))[90:154, 50:114, :]


def _lora_is_identity_at_init(network: torch.nn.Module, x: torch.Tensor) -> None:
    """A LoRA adapter starts as the identity: the adapted network's logits equal the network's own."""
    network.eval()
    with torch.no_grad():
        before = network(x)
        assert apply_adapter(network, LoRAConfig(r=2))
        after = network(x)
    assert torch.allclose(before, after, atol=1e-5)


# --- safe loading -----------------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    for load in (load_state_dict_file, load_checkpoint):
        with pytest.raises(ModelError, match="refused") as error:
            load(path)
        assert str(path) in str(error.value) and "safetensors" in str(error.value)
    assert not marker.exists()


def test_weight_files_load_by_content_and_missing_ones_are_named(tmp_path):
    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "model.pth"))  # safetensors under a .pth name, as brainchop ships
    torch.save({"state_dict": state}, tmp_path / "wrapped.ckpt")
    for name in ("model.pth", "wrapped.ckpt"):
        loaded = load_state_dict_file(tmp_path / name)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["b"], state["b"])
    with pytest.raises(ModelError, match="missing") as error:
        load_state_dict_file(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in str(error.value)


def test_checksum_mismatch_and_wrong_shapes_are_named(tmp_path):
    path = tmp_path / "model.pt"
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 2, 1))
    torch.save(network.state_dict(), path)
    assert verify_sha256(path, sha256_file(path)) == path
    with pytest.raises(ModelError, match="checksum mismatch") as error:
        verify_sha256(path, "0" * 64)
    assert str(path) in str(error.value)
    other = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3), torch.nn.Conv3d(8, 2, 1))
    with pytest.raises(ModelError, match="shape mismatch") as error:
        load_into(other, load_state_dict_file(path), path)
    assert str(path) in str(error.value) and "0.weight (4, 1, 3, 3, 3)" in str(error.value)


# --- MONAI bundle -----------------------------------------------------------------------------------------------------


def _bundle_network() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                num_res_units=1, norm="batch")


def _write_bundle(folder: Path, network_def: dict | None = None, channel_def: dict | None = None) -> UNet:
    """A bundle laid out and written like the MONAI model zoo's spleen_ct_segmentation (smaller UNet)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "channels": [4, 8, 16],
        "network_def": network_def or {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                       "channels": "@channels", "strides": [2, 2], "num_res_units": 1,
                                       "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0,
             "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
        "run": ["$@evaluator.run()"],
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.5.0", "monai_version": "1.3.0", "name": "Spleen CT segmentation",
        "task": "Decathlon spleen segmentation", "description": "A spleen segmentation model (test size).",
        "authors": "MONAI team", "copyright": "Copyright (c) MONAI Consortium", "license": "Apache-2.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": channel_def or {"0": "background", "1": "spleen"}}},
        },
    }
    if channel_def == {}:
        del metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    network = _bundle_network().eval()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return network


def test_monai_bundle_loads_with_its_card_and_segments_a_real_ct(tmp_path):
    reference = _write_bundle(tmp_path / "spleen_ct_segmentation")
    model = load_model(tmp_path / "spleen_ct_segmentation")
    card = model.card
    assert card.spacing == (1.5, 1.5, 2.0) and card.orientation == "RAS" and card.inference_roi == (32, 32, 32)
    assert card.normalization == {"name": "clip_scale", "lower": -57, "upper": 164, "clip": True,
                                  "out_min": 0, "out_max": 1}
    assert [label.name for label in card.labels] == ["background", "spleen"] and card.modality == "CT"
    assert card.divisible_by == 4
    case = prepare_case("spleen", [_ct_crop()], card)
    assert 0.0 <= case.array.min() and case.array.max() <= 1.0 and case.array.shape[1:] == (34, 34, 65)
    x = torch.from_numpy(case.array[None, :, :32, :32, :32].copy())
    with torch.no_grad():
        assert torch.allclose(model.network(x), reference(x), atol=1e-6)
    _, user_label = predict_case(model.network, case, card)
    assert user_label.GetSize() == case.image.GetSize()
    _lora_is_identity_at_init(model.network, x)


def test_a_batch_norm_model_trains_with_its_statistics_frozen_so_its_adapter_gives_what_the_job_gave(tmp_path):
    """Found by reading the trainer: it put the whole network in training mode, so the frozen model's batch norms
    moved their running statistics with every patch, and the job audited and segmented with those; the adapter holds
    its units only, so `predict --adapter` (and a kept source) gave other segmentations than the job's."""
    _write_bundle(tmp_path / "bundle")
    crop = (slice(90, 154), slice(50, 114), slice(None))
    sitk.WriteImage(_ct_crop(), str(tmp_path / "ct.nii.gz"))
    label = sitk.ReadImage(str(shared(SPLEEN_CT.replace("_ct.nii.gz", "_ct_seg-manual.nii.gz"))))[crop]
    sitk.WriteImage(label, str(tmp_path / "spleen.nii.gz"))
    common = ["--model", str(tmp_path / "bundle"), "--device", "cpu"]
    assert main(["adapt", *common, "--method", "lora", "--rank", "1", "--train", str(tmp_path / "ct.nii.gz"),
                 str(tmp_path / "spleen.nii.gz"), "--steps", "4", "--audit-every", "2", "--patch-size", "32",
                 "--predict", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "job")]) == 0
    assert main(["predict", *common, "--adapter", str(tmp_path / "job"), "--image", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "again.nii.gz")]) == 0
    job = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "job" / "predictions" / "ct_seg.nii.gz")))
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nii.gz")))
    assert np.array_equal(job, again)


def test_torchscript_bundle_and_torchscript_card_adapt_in_weight_space(tmp_path, monkeypatch):
    folder = tmp_path / "bundle_ts"
    network = _write_bundle(folder)
    scripted = torch.jit.script(network)
    (folder / "models" / "model.pt").unlink()
    torch.jit.save(scripted, str(folder / "models" / "model.ts"))
    monkeypatch.setenv("PEFTADAPT_HOME", str(tmp_path / "home"))  # TorchScript is code: loaded once trusted
    trust_file(folder / "models" / "model.ts")
    model = load_model(folder)
    assert isinstance(model.network, torch.jit.ScriptModule) and model.card.extra["torchscript"]
    # the same network as a TorchScript file with a card beside it
    card_folder = tmp_path / "spleen_ts"
    card_folder.mkdir()
    torch.jit.save(scripted, str(card_folder / "model.ts"))
    model.card.save(card_folder / "model.card.json")
    loaded = load_model(card_folder)
    assert loaded.card.labels == model.card.labels and loaded.card.extra["format"] == "torchscript"
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = loaded.network(x)
        adapted = with_adapter(loaded, LoRAConfig(r=2))
        assert len(adapted.network.layer_names) > 0
        assert torch.allclose(adapted.network(x), expected, atol=1e-5)
    # an adaptation job on it is refused before its job folder exists: test_model_folders.py


def test_bundle_code_in_the_network_definition_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _write_bundle(tmp_path / "expr", network_def={"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                                                  "out_channels": f"$__import__('os').system('touch {marker}') or 2",
                                                  "channels": [4, 8, 16], "strides": [2, 2]})
    with pytest.raises(ModelError, match="refused to evaluate") as error:
        load_model(tmp_path / "expr")
    assert "inference.json" in str(error.value)
    _write_bundle(tmp_path / "target", network_def={"_target_": "os.system", "command": f"touch {marker}"})
    with pytest.raises(ModelError, match="refused to import 'os.system'"):
        load_model(tmp_path / "target")
    assert not marker.exists()


def test_bundle_missing_keys_and_files_are_named(tmp_path):
    _write_bundle(tmp_path / "no_labels", channel_def={})
    with pytest.raises(ModelError, match="channel_def") as error:
        load_model(tmp_path / "no_labels")
    assert "metadata.json" in str(error.value)
    _write_bundle(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="model.pt: file is missing"):
        load_model(tmp_path / "no_weights")


# --- nnU-Net v2 -------------------------------------------------------------------------------------------------------

ARCH_KWARGS = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def _write_nnunet(root: Path, class_name: str = "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                  legacy: bool = False) -> tuple[Path, torch.nn.Module]:
    """A trained-model folder as nnU-Net v2 writes it (Dataset/Trainer__Plans__config/fold_0/checkpoint_final.pth)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    folder = root / "Dataset042_Spleen" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1}, "numTraining": 41,
               "file_ending": ".nii.gz", "licence": "CC-BY-SA 4.0"}
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 48, 48], "median_image_size_in_voxels": [26, 166, 164], "spacing": [5.0, 0.7949, 0.7949],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
    }
    if legacy:  # nnU-Net < 2.4 plans: a flat U-Net description
        configuration.update({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4,
                              "unet_max_num_features": 16, "n_conv_per_stage_encoder": [1, 1, 1],
                              "n_conv_per_stage_decoder": [1, 1], "num_pool_per_axis": [1, 2, 2],
                              "pool_op_kernel_sizes": ARCH_KWARGS["strides"],
                              "conv_kernel_sizes": ARCH_KWARGS["kernel_sizes"]})
    else:
        configuration["architecture"] = {"network_class_name": class_name, "arch_kwargs": ARCH_KWARGS,
                                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {
        "dataset_name": "Dataset042_Spleen", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [5.0, 0.7949, 0.7949],
        "original_median_shape_after_transp": [26, 166, 164], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {"patch_size": [160, 160], "spacing": [0.79, 0.79]}, "3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1311.0, "mean": 99.29, "median": 101.0, "min": -1024.0, "percentile_00_5": -37.0,
            "percentile_99_5": 228.0, "std": 38.62}},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    torch.manual_seed(1)
    kwargs = {**ARCH_KWARGS, "conv_op": torch.nn.Conv3d, "norm_op": torch.nn.InstanceNorm3d,
              "nonlin": torch.nn.LeakyReLU}
    network = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **kwargs).eval()
    checkpoint = {
        "network_weights": network.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None, "logging": {"mean_fg_dice": [np.float64(0.41), np.float64(0.57)],
                                               "ema_fg_dice": [np.float64(0.41), np.float64(0.43)]},
        "_best_ema": np.float64(0.43), "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder, network


@pytest.mark.parametrize("legacy", [False, True], ids=["plans-2.4", "plans-2.2"])
def test_nnunet_folder_loads_with_its_preprocessing_and_segments_a_real_ct(tmp_path, legacy):
    folder, reference = _write_nnunet(tmp_path, legacy=legacy)
    model = load_model(folder)
    card = model.card
    assert card.spacing == (0.7949, 0.7949, 5.0) and card.patch_size == (48, 48, 16) and card.orientation == ""
    assert card.normalization == {"name": "ct_zscore", "lower": -37.0, "upper": 228.0, "mean": 99.29, "std": 38.62}
    assert [(label.value, label.name) for label in card.labels] == [(0, "background"), (1, "spleen")]
    assert card.divisible_by == 4 and card.extra["mirroring_axes"] == [0, 1, 2]
    case = prepare_case("spleen", [_ct_crop()], card)
    assert case.array.shape[1:] == (64, 64, 26)  # already at the planned spacing
    ours = torch.from_numpy(case.array[None, :, :48, :48, :16].copy())
    nnunet_order = ours.permute(0, 1, 4, 3, 2)  # nnU-Net's (z, y, x)
    with torch.no_grad():
        assert torch.allclose(model.network(ours), reference(nnunet_order).permute(0, 1, 4, 3, 2), atol=1e-5)
    model_label, user_label = predict_case(model.network, case, card)
    assert model_label.shape == (64, 64, 26) and user_label.GetSize() == case.image.GetSize()
    _lora_is_identity_at_init(model.network, ours)


def test_nnunet_plans_cannot_name_arbitrary_code_and_bad_checkpoints_are_named(tmp_path):
    folder, _ = _write_nnunet(tmp_path / "a", class_name="os.system")
    with pytest.raises(ModelError, match="refused to import 'os.system'") as error:
        load_model(folder)
    assert "plans.json" in str(error.value)
    folder, _ = _write_nnunet(tmp_path / "b")
    marker = tmp_path / "pwned"
    torch.save({"network_weights": {}, "payload": _RunsCode(marker)}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match="refused"):
        load_model(folder)
    assert not marker.exists()
    state = _write_nnunet(tmp_path / "c")[1].state_dict()
    state["decoder.seg_layers.0.weight"] = torch.zeros(3, 4, 1, 1, 1)
    checkpoint_path = tmp_path / "c" / "Dataset042_Spleen" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0" / \
        "checkpoint_final.pth"
    torch.save({"network_weights": state}, checkpoint_path)
    with pytest.raises(ModelError, match=r"shape mismatch .*decoder.seg_layers.0.weight \(3, 4, 1, 1, 1\)"):
        load_model(checkpoint_path.parents[1])
    checkpoint_path.unlink()
    with pytest.raises(ModelError, match="fold_\\*: no checkpoint_final.pth"):
        load_model(checkpoint_path.parents[1])


# --- brainchop MeshNet (real models) ----------------------------------------------------------------------------------


def test_meshnet_grey_white_matter_on_a_real_t1():
    model = load_model(shared("meshnet/model5_gw_ae"))
    card = model.card
    assert [label.name for label in card.labels] == ["background", "White Matter", "Grey Matter"]
    assert card.spacing == (1.0, 1.0, 1.0) and card.orientation == "LIA"
    case = load_case(shared("meshnet/t1_crop.nii.gz"), card)  # already conformed: 256³, 1 mm, LIA
    assert case.array.shape == (1, 256, 256, 256) and case.array.min() == 0.0 and case.array.max() == 1.0
    with torch.no_grad():
        logits = model.network(torch.from_numpy(case.array)[None])
    counts = np.bincount(logits[0].argmax(0).numpy().ravel(), minlength=3)
    white_cm3, grey_cm3 = counts[1] / 1000, counts[2] / 1000  # 1 mm³ voxels
    assert 300 < white_cm3 < 800 and 400 < grey_cm3 < 1000, (white_cm3, grey_cm3)
    assert 0.5 < white_cm3 / grey_cm3 < 1.5
    x = torch.from_numpy(case.array[None, :, 96:128, 96:128, 96:128].copy())
    _lora_is_identity_at_init(model.network, x)


def test_meshnet_mindgrab_builds_from_its_layer_list():
    model = load_model(shared("meshnet/mindgrab"))
    convs = [m for m in model.network.modules() if isinstance(m, torch.nn.Conv3d)]
    norms = [m for m in model.network.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 26 and len(norms) == 25 and convs[0].out_channels == 15 and model.card.num_classes == 2
    assert [c.dilation[0] for c in convs[:5]] == [16, 8, 4, 2, 1]
    with torch.no_grad():
        assert model.network(torch.rand(1, 1, 24, 24, 24)).shape == (1, 2, 24, 24, 24)


# --- model folder, registry and `peftadapt models` --------------------------------------------------------------------


def test_model_folder_lists_each_format_with_its_status(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    _write_bundle(models / "spleen-bundle")
    nnunet_folder, _ = _write_nnunet(tmp_path / "nnunet")
    shutil.copytree(nnunet_folder, models / "spleen-nnunet")
    meshnet = models / "gwm"
    meshnet.mkdir()
    for name in ("model.json", "model.pth", "colormap.json", "colormap3.json"):
        shutil.copy(shared(f"meshnet/model5_gw_ae/{name}"), meshnet / name)
    weights_sha = sha256_file(meshnet / "model.pth")
    (meshnet / "registry.json").write_text(json.dumps({
        "id": "brainchop-gwm", "version": "1", "title": "brainchop grey/white matter", "format": "meshnet",
        "path": ".", "license": "MIT", "source": "https://github.com/neuroneural/brainchop",
        "sha256": {"model.pth": weights_sha}, "memory_mb": 1200, "time_s": 30, "modality": "MR (T1w)",
        "inputs": ["T1w"], "spacing": [1, 1, 1]}))
    corrupt = models / "gwm-corrupt"
    shutil.copytree(meshnet, corrupt)
    (corrupt / "registry.json").write_text(
        (meshnet / "registry.json").read_text().replace("brainchop-gwm", "gwm-corrupt").replace(weights_sha, "0" * 64))
    _write_bundle(models / "no-weights")
    (models / "no-weights" / "models" / "model.pt").unlink()
    (models / "notes").mkdir()  # not a model: ignored
    monkeypatch.setenv("PEFTADAPT_MODELS", str(models))

    rows, problems = list_models()
    status = {row.id: row.status for row in rows}
    assert problems == []
    assert set(status) == {"deepbet-brain", "spleen-bundle", "spleen-nnunet", "brainchop-gwm", "gwm-corrupt",
                           "no-weights"}
    assert status["spleen-bundle"] == status["spleen-nnunet"] == status["brainchop-gwm"] == "available"
    assert "checksum mismatch" in status["gwm-corrupt"] and "model.pth" in status["gwm-corrupt"]
    assert "does not hold a monai_bundle" in status["no-weights"] or "missing" in status["no-weights"]
    assert load_model("brainchop-gwm").card.title == "brainchop grey/white matter"
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model("gwm-corrupt")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "spleen-nnunet: nnU-Net Dataset042_Spleen (3d_fullres) [nnunet_v2]" in out and "checksum mismatch" in out


def test_registry_entries_are_validated_against_the_schema(tmp_path, monkeypatch):
    schema = registry_schema()
    good = {"id": "m", "version": "1", "title": "t", "format": "nnunet_v2", "path": "m", "license": "MIT",
            "source": "s", "labels": [{"value": 0, "name": "background", "color": [0, 0, 0]}]}
    assert validate(good, schema) == []
    bad = {**good, "format": "onnx", "sha256": {"w.pth": "abc"}, "labels": [{"value": -1}], "colour": 1}
    problems = " | ".join(validate(bad, schema))
    for fragment in ("format: should be one of", "sha256.w.pth", "labels[0]: 'name' is required",
                     "labels[0].value: below 0", "unknown key 'colour'"):
        assert fragment in problems
    (tmp_path / "registry.json").write_text(json.dumps([bad]))
    monkeypatch.setenv("PEFTADAPT_MODELS", str(tmp_path))
    _, problems = list_models()
    assert len(problems) == 1 and "registry.json: invalid registry entry" in problems[0]
    with pytest.raises(ModelError, match=r"model 'm' cannot be used: .*registry.json: invalid registry entry"):
        load_model("m")


def test_builtin_default_model_is_listed_first():
    rows, _ = list_models(Path("/nonexistent"))
    assert rows[0].id == "deepbet-brain" and rows[0].format == "builtin" and rows[0].status == "available"
