"""Shallow fine-tuning defined without layer names: depth on the real computation graph, on three real
architectures (MONAI UNet, deepbet's LinkNet3d with its shipped weights, brainchop's MeshNet from its files)."""
from __future__ import annotations

import SimpleITK as sitk
import torch
from torch import nn

from conftest import shared
from PEFTAdaptLib.adapters import UNIT_TYPES, count_trainable, iter_units
from PEFTAdaptLib.adapters.shallow import ShallowConfig, apply_shallow, layer_depths, shallow_layers
from PEFTAdaptLib.models.registry import load_model
from PEFTAdaptLib.seapeft import build_pool


def spine_unet() -> nn.Module:
    """The benchmark's spine source architecture (bench/shifts.py), randomly initialised: the graph is the point."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 1), num_res_units=2)


def spine_patch() -> torch.Tensor:
    """A real T1 spinal-cord patch (1 × 1 × 32 × 32 × 16)."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("spine/t1/t1w.nii.gz")), sitk.sitkFloat32))
    patch = torch.from_numpy(image[:16, 20:52, 5:37].transpose(2, 1, 0).copy())
    return ((patch - patch.mean()) / patch.std())[None, None]


def test_unet_shallow_layers_are_its_input_block_and_output_block_not_what_its_skips_reach():
    network = spine_unet()
    layers = shallow_layers(network, spine_patch())
    # the first residual unit (both convs and its residual projection, which also reads the input) and the last
    # up-block (transposed conv and output conv) — the recipe the benchmark used to pick by hand ("model.0.*",
    # "model.2.*"). Along the *shortest* path the skips and residual projections would add model.1's outer layers.
    assert layers == ["model.0.residual", "model.0.conv.unit0.conv", "model.0.conv.unit1.conv", "model.2.0.conv",
                      "model.2.1.conv.unit0.conv"]
    depths = layer_depths(network, spine_patch())
    assert depths["model.0.conv.unit0.conv"].from_input == 1 and depths["model.2.1.conv.unit0.conv"].from_output == 1
    assert list(depths) == sorted(depths, key=lambda n: depths[n].order) and len(depths) == 23


def test_deepbet_shallow_layers_are_its_stem_and_head(deepbet):
    network = deepbet.network
    layers = shallow_layers(network, torch.zeros(1, 1, 64, 64, 64))
    assert layers == ["init.0", "down0.block1.double_conv.0", "conv.0", "tp_conv2"]
    assert network.get_submodule(layers[0]).in_channels == 1  # the input convolution (7³ stem)
    assert network.get_submodule(layers[-1]).out_channels == 2  # the output (transposed) convolution


def test_meshnet_shallow_layers_are_its_first_two_and_last_two_convolutions():
    model = load_model(shared("meshnet/model5_gw_ae"))
    convs = [n for n, m in model.network.named_modules() if isinstance(m, nn.Conv3d)]
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("meshnet/t1_crop.nii.gz")), sitk.sitkFloat32))
    x = torch.from_numpy(t1[112:144, 112:144, 112:144].copy())[None, None] / float(t1.max())
    layers = shallow_layers(model.network, x)
    assert layers == convs[:2] + convs[-2:]
    assert model.network.get_submodule(layers[0]).in_channels == 1
    assert model.network.get_submodule(layers[-1]).out_channels == model.card.num_classes
    assert shallow_layers(model.network, x, depth=1) == [convs[0], convs[-1]]


def test_apply_shallow_trains_dense_deltas_there_and_norm_affine_everywhere_starting_as_the_source():
    network = spine_unet()
    x = spine_patch()
    with torch.no_grad():
        before = network.eval()(x)
    records = apply_shallow(network, x)
    dense = {r.layer: r for r in records if r.unit.kind == "dense"}
    norms = [r for r in records if r.unit.kind == "norm_affine"]
    assert sorted(dense) == sorted(shallow_layers(spine_unet(), x))
    assert len(norms) == 17  # every instance norm of the UNet
    expected = sum(network.get_submodule(n).base.weight.numel() + network.get_submodule(n).base.bias.numel()
                   for n in dense) + sum(r.unit.num_trainable() for r in norms)
    assert count_trainable(network) == expected == 12_100
    with torch.no_grad():
        assert torch.allclose(network.eval()(x), before, atol=1e-6), "identity at start"
    assert apply_shallow(spine_unet(), x, ShallowConfig(depth=1, norm_affine=False))[0].unit.kind == "dense"


def test_shallow_layers_see_through_adapted_layers():
    """On a network already carrying adapter units (e.g. SEA-PEFT's whole pool) the layers are the same."""
    network = spine_unet()
    build_pool(network, families=tuple(k for k in ("lora", "dense", "norm_affine") if k in UNIT_TYPES))
    assert any(True for _ in iter_units(network))
    assert shallow_layers(network, spine_patch()) == shallow_layers(spine_unet(), spine_patch())
