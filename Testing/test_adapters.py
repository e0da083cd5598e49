"""Every adapter type: identity at initialisation, gates, merge/unmerge, closed-form parameter counts,
save/load round trips, and independent checks of SALT's formula and AdaBN's statistics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from PEFTAdaptLib.adapters import (
    AdaBNConfig, AdaptFormerConfig, BitFitConfig, ConvLoRAConfig, DenseConfig, LoRAConfig, NormAffineConfig,
    SALTConfig, SVDConfig, apply_adapter, count_trainable, estimate_adabn, fingerprint, freeze_base, iter_units, load_adapters,
    merge_all, parameter_groups, save_adapters, unmerge_all,
)
from PEFTAdaptLib.errors import ModelError


class Net(nn.Module):
    """Every layer family the library adapts: conv, batch/instance/layer norm, transposed conv, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.inorm = nn.InstanceNorm3d(6)  # no affine: norm-affine must add one
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        h = self.inorm(torch.relu(self.bn(self.conv(x))))
        h = self.up(h).amax(dim=(2, 3, 4))  # max, not mean: the instance norm would cancel a mean
        return self.ln(self.fc(h))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics, as in a trained network
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


# (config, {layer: closed-form trainable count})
CASES = {
    "lora": (LoRAConfig(r=2, alpha=4), {"conv": 2 * (2 * 27 + 6), "up": 2 * (6 + 4 * 8), "fc": 2 * (4 + 5)}),
    "lora_rs_pissa": (LoRAConfig(r=2, alpha=4, use_rslora=True, init="pissa", target_modules=("conv", "fc")),
                      {"conv": 2 * (2 * 27 + 6), "fc": 2 * (4 + 5)}),
    "convlora_paper": (ConvLoRAConfig(r=2, alpha=2), {"conv": 2 * 3 * (2 * 9 + 6 * 3)}),
    "convlora_peft": (ConvLoRAConfig(r=2, alpha=2, factorisation="peft", target_modules=("conv",)),
                      {"conv": 2 * (2 * 27 + 6)}),
    "salt": (SALTConfig(rank=2, lora_rank=2), {"conv": 2 * 2 + 2 * 4 * 2, "up": 2 * 2 + 2 * 4 * 2,
                                               "fc": 2 * 2 + 2 * 2 * 2}),
    "svd": (SVDConfig(), {"conv": 2 * 6, "up": 2 * 6, "fc": 2 * 4}),
    "norm_affine": (NormAffineConfig(), {"bn": 12, "inorm": 12, "ln": 10}),
    "bitfit": (BitFitConfig(), {"conv": 6, "up": 4, "fc": 5}),
    "dense": (DenseConfig(), {"conv": 6 * 2 * 27 + 6, "up": 6 * 4 * 8 + 4, "fc": 5 * 4 + 5}),
    "adaptformer": (AdaptFormerConfig(bottleneck=3), {"fc": 4 * 3 + 3 + 3 * 5 + 5}),
    "adabn": (AdaBNConfig(), {"bn": 0}),
}


def adapted(name: str):
    net = make_net()
    config, _ = CASES[name]
    apply_adapter(net, copy.deepcopy(config), "unit")
    freeze_base(net)
    return net


def perturb(net: nn.Module) -> None:
    """Stand-in for training steps: move every unit tensor (AdaBN statistics included) off its start."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for record in iter_units(net):
            statistics = [b for n, b in record.unit.named_buffers() if n.startswith("running_")]
            for tensor in list(record.unit.parameters()) + statistics:
                tensor.add_(0.3 * torch.rand(tensor.shape, generator=generator) * tensor.abs().mean().clamp(min=0.1))


X = torch.randn(3, 2, 6, 6, 6, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", CASES)
def test_identity_at_initialisation(name):
    assert (adapted(name)(X) - make_net()(X)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", CASES)
def test_exact_parameter_count(name):
    net = adapted(name)
    counts = {r.layer: r.unit.num_trainable() for r in iter_units(net)}
    assert counts == CASES[name][1]
    assert count_trainable(net) == sum(CASES[name][1].values())
    assert count_trainable(net) == sum(p.numel() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CASES)
def test_gate_off_restores_the_base_and_keeps_trained_weights(name):
    net = adapted(name)
    perturb(net)
    trained = net(X)
    assert (trained - make_net()(X)).abs().max() > 1e-4, "perturbed units change the output"
    for record in iter_units(net):
        record.owner.set_active(record.name, False)
    assert torch.allclose(net(X), make_net()(X), atol=1e-6)
    for record in iter_units(net):
        record.owner.set_active(record.name, True)
    assert torch.equal(net(X), trained)


@pytest.mark.parametrize("name", [n for n in CASES if n != "adaptformer"])
def test_merge_matches_and_unmerge_restores_the_base_exactly(name):
    net = adapted(name)
    perturb(net)
    expected = net(X)
    base_state = {k: v.clone() for k, v in make_net().state_dict().items()}
    merge_all(net)
    merged = net(X)
    assert ((merged - expected).norm() / expected.norm()).item() <= 1e-4
    # the merged layers run as plain layers: a copy of the bare base modules gives the same output
    plain = make_net()
    for layer_name, layer in net.named_modules():
        if hasattr(layer, "base") and hasattr(layer, "units"):
            parent, _, child = layer_name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, copy.deepcopy(layer.base))
    assert torch.allclose(plain(X), merged, rtol=1e-5, atol=1e-6)
    unmerge_all(net)
    restored = {k.replace(".base.", ".").replace("base.", ""): v for k, v in net.state_dict().items()
                if ".units." not in f".{k}."}
    for key, value in base_state.items():
        assert torch.equal(restored[key], value), key
    assert getattr(net.inorm, "base", net.inorm).weight is None  # the added affine is gone again


def test_output_space_adapter_refuses_to_merge():
    net = adapted("adaptformer")
    with pytest.raises(RuntimeError, match="cannot be merged"):
        merge_all(net)


@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip_and_wrong_base(tmp_path, name):
    net = adapted(name)
    perturb(net)
    expected = net(X)
    save_adapters(net, tmp_path / "adapter", fingerprint(make_net()), {"case": name})
    fresh = make_net()
    load_adapters(fresh, tmp_path / "adapter", fingerprint(make_net()))
    assert torch.equal(fresh(X), expected)
    other = make_net()
    with torch.no_grad():
        other.fc.weight.add_(1e-3)
    with pytest.raises(ModelError, match="different base model"):
        load_adapters(other, tmp_path / "adapter", fingerprint(other))


def test_salt_equals_a_dense_evaluation_of_its_formula():
    torch.manual_seed(3)
    layer = nn.Linear(7, 9)
    net = nn.Sequential(copy.deepcopy(layer))
    [record] = apply_adapter(net, SALTConfig(rank=3, lora_rank=2), "salt")
    unit = record.unit
    with torch.no_grad():
        unit.scale.copy_(torch.tensor([1.5, 0.2, -0.4]))  # -0.4 drives a singular value negative: ReLU clips
        unit.shift.copy_(torch.tensor([0.1, -0.3, 0.05]))
        unit.X.normal_()
        unit.Y.normal_()
    # independent dense formula: W' = U ReLU(Σ') Vᵀ, Σ' = diag(aσ_top + b) ⊕ (diag σ_rest + X Y)
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    # the unit's basis is this SVD up to the sign of each pair (its canonical choice, tested elsewhere)
    signs = torch.sign((u * unit.U.double()).sum(0))
    assert torch.allclose(u * signs, unit.U.double(), atol=1e-5)
    u, vh = u * signs, vh * signs[:, None]
    a, b = unit.scale.detach().double(), unit.shift.detach().double()
    xy = unit.X.detach().double() @ unit.Y.detach().double()
    sigma = torch.zeros(7, 7, dtype=torch.double)
    sigma[:3, :3] = torch.diag(a * s[:3] + b)
    sigma[3:, 3:] = torch.diag(s[3:]) + xy
    weight = u @ torch.relu(sigma) @ vh
    x = torch.randn(4, 7)
    expected = x.double() @ weight.T + layer.bias.detach().double()
    assert torch.allclose(net(x).double(), expected, atol=1e-5)


def test_adabn_estimates_target_batch_statistics():
    net = adapted("adabn")
    target = [torch.randn(2, 2, 6, 6, 6) * 3 + 1 for _ in range(3)]
    assert estimate_adabn(net, target) == 3
    [record] = list(iter_units(net))
    with torch.no_grad():
        inputs = [net.conv(t) for t in target]
    dims = (0, 2, 3, 4)
    expected_mean = torch.stack([i.mean(dim=dims) for i in inputs]).mean(0)
    expected_var = torch.stack([i.var(dim=dims) for i in inputs]).mean(0)
    assert torch.allclose(record.unit.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(record.unit.running_var, expected_var, atol=1e-4)
    # the gate switches between source and target statistics
    source = make_net().bn.running_mean
    assert not torch.allclose(record.unit.running_mean, source)
    assert count_trainable(net) == 0


def test_merge_and_unload_leaves_plain_layers_with_the_adapted_function():
    from PEFTAdaptLib.adapters import AdaptedLayer, merge_and_unload

    net = adapted("lora")
    perturb(net)
    expected = net(X)
    merge_and_unload(net)
    assert not any(isinstance(m, AdaptedLayer) for m in net.modules())
    assert torch.allclose(net(X), expected, rtol=1e-5, atol=1e-6)


def test_dense_delta_trains_exactly_like_fine_tuning_the_layer_at_a_third_of_the_rate():
    """W + ΔW with ΔW = 0 is fine-tuning W; its optimizer group runs at lr × DenseUnit.lr_scale (= 1/3)."""
    net, reference = make_net(), make_net()
    apply_adapter(net, DenseConfig(target_modules=("conv",)), "dense")
    apply_adapter(net, LoRAConfig(r=2, alpha=2, target_modules=("fc",)), "lora")
    freeze_base(net)
    groups = parameter_groups(net, lr=3e-3)
    assert sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in groups) == [
        (pytest.approx(1e-3), 6 * 2 * 27 + 6), (pytest.approx(3e-3), 2 * (4 + 5))]
    for p in reference.parameters():
        p.requires_grad_(p is reference.conv.weight or p is reference.conv.bias)
    net.get_submodule("fc").set_active("lora", False)  # gated off: no gradient, so the network is the reference's
    mine = torch.optim.AdamW(groups, weight_decay=0.0)
    theirs = torch.optim.AdamW([reference.conv.weight, reference.conv.bias], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        for model, optimizer in ((net, mine), (reference, theirs)):
            optimizer.zero_grad()
            model(X)[:, 0].sum().backward()
            optimizer.step()
    adapted_conv = net.get_submodule("conv").effective_params()
    assert torch.allclose(adapted_conv["weight"], reference.conv.weight, atol=1e-6)
    assert torch.allclose(adapted_conv["bias"], reference.conv.bias, atol=1e-6)


def test_a_layer_registered_under_two_names_is_adapted_under_both():
    """nnU-Net's blocks (dynamic_network_architectures) hold each conv and norm as `conv`/`norm` and run them as
    `all_modules.0`/`.1`: every adapter must reach the forward, and merge_and_unload must leave no wrapper behind."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from PEFTAdaptLib.adapters import AdaptedLayer, merge_and_unload

    torch.manual_seed(0)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 2, (1, 1), conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU).eval()
    net = copy.deepcopy(base)
    apply_adapter(net, LoRAConfig(r=2), "lora")
    apply_adapter(net, NormAffineConfig(), "affine")
    freeze_base(net)
    perturb(net)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    y = net(x)
    y.square().sum().backward()
    without = {r.layer for r in iter_units(net) if any(p.grad is None for p in r.unit.parameters())}
    unused_heads = {f"decoder.seg_layers.{i}" for i in range(len(net.decoder.seg_layers) - 1)}  # deep supervision off
    assert without == unused_heads
    assert (y - base(x)).abs().max() > 1e-3
    merge_and_unload(net)
    assert not any(isinstance(m, AdaptedLayer) for _, m in net.named_modules(remove_duplicate=False))
    assert torch.allclose(net(x), y, rtol=1e-5, atol=1e-5)
