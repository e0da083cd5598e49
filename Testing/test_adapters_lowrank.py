"""The factored (low-rank) backward of adapted layers equals the dense weight-gradient path it replaces: outputs
and every gradient, for each adapter type on every layer type and dimension (grouped, strided, dilated, padded,
transposed), several units on one layer, training steps with gates, save/load and bf16 autocast; and it never
forms the dense weight gradient."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from PEFTAdaptLib.adapters import (
    BitFitConfig, BitFitUnit, ConvLoRAConfig, ConvLoRAUnit, DenseConfig, LoRAConfig, LoRAUnit, SALTConfig, SALTUnit,
    SVDConfig, add_units, apply_adapter, freeze_base, iter_units, load_adapters, lowrank, parameter_groups,
    save_adapters,
)
from PEFTAdaptLib.adapters.base import adapted_layers

# (layer, input shape): every layer type and dimension, with groups, strides, dilation, padding modes
LAYERS = {
    "linear": (lambda: nn.Linear(10, 7), (2, 3, 10)),
    "conv1d_grouped_strided_dilated": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1, dilation=2, groups=2),
                                       (2, 6, 11)),
    "conv2d_reflect_grouped": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4,
                                                 padding_mode="reflect"), (2, 8, 9, 9)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (1, 4, 7, 7)),
    "conv3d_strided": (lambda: nn.Conv3d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7, 7)),
    "conv3d_grouped_dilated": (lambda: nn.Conv3d(6, 9, 3, padding=2, dilation=2, groups=3), (1, 6, 6, 6, 6)),
    # nnU-Net's in-plane kernel on anisotropic data (ConvLoRA refused it: "needs a cubic kernel")
    "conv3d_anisotropic": (lambda: nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1)), (2, 4, 3, 6, 6)),
    "convtranspose1d_grouped": (lambda: nn.ConvTranspose1d(6, 4, 3, stride=3, padding=1, output_padding=2,
                                                           groups=2, dilation=2), (3, 6, 5)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 5, 5)),
    "convtranspose3d_grouped": (lambda: nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1,
                                                           groups=2), (2, 6, 4, 4, 4)),
}
CONFIGS = {
    "lora": LoRAConfig(r=2, alpha=3),
    "lora_rslora_pissa": LoRAConfig(r=2, alpha=4, use_rslora=True, init="pissa"),
    "lora_dropout": LoRAConfig(r=3, alpha=3, dropout=0.4),
    "convlora": ConvLoRAConfig(r=1, alpha=2),
    "salt": SALTConfig(rank=1, lora_rank=2),
    "svd": SVDConfig(),
    "dense": DenseConfig(),
    "bitfit": BitFitConfig(),
}
LOW_RANK = ("lora", "lora_rslora_pissa", "lora_dropout", "convlora")
WITH_BASIS = ("salt", "svd")  # run in the product form: the whole layer in the unit's singular basis
FACTORED = {"_FactoredLayerBackward", "_ProductLayerBackward"}


def factored(monkeypatch, on: bool) -> None:
    """Force every eligible layer onto the factored path (on) or the dense weight-gradient path (off)."""
    monkeypatch.setattr(lowrank, "FORCE", "factored" if on else "dense")


def perturb(net: nn.Module, seed: int = 1) -> None:
    """Trained-looking units; singular-value scales and shifts kept positive, so that no ReLU zeroes a whole unit's
    gradient (SALT's rank-1 top part would get none)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for record in iter_units(net):
            for name, p in record.unit.named_parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
                if name in ("scale", "shift"):
                    p.abs_()


def adapted_layer(layer_name: str, configs: dict, dtype=torch.float64) -> tuple[nn.Module, torch.Tensor]:
    make, shape = LAYERS[layer_name]
    torch.manual_seed(0)
    net = nn.Sequential(make().to(dtype))
    for unit_name, config in configs.items():
        apply_adapter(net, copy.deepcopy(config), unit_name)
    freeze_base(net)
    perturb(net)
    net.train()
    return net, torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)


def forward_backward(net: nn.Module, x: torch.Tensor):
    """Output, its autograd node, and the gradients of the input and of every unit parameter."""
    for p in net.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout masks on both paths
    y = net(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * weights).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return y.detach(), y.grad_fn, {"input": x.grad.clone(), **grads}


def applicable(layer_name: str, config_name: str) -> bool:
    return config_name != "convlora" or layer_name.startswith("conv") and not layer_name.startswith("convtranspose")


CASES = [(layer, config) for layer in LAYERS for config in CONFIGS if applicable(layer, config)]


def assert_paths_agree(monkeypatch, net, x, node_name: str) -> dict:
    """The forced factored path runs as `node_name` and equals the dense path: output and every gradient."""
    factored(monkeypatch, False)
    y_dense, dense_node, dense = forward_backward(net, x)
    assert type(dense_node).__name__ not in FACTORED
    factored(monkeypatch, True)
    y, node, grads = forward_backward(net, x)
    assert type(node).__name__ == node_name
    assert torch.allclose(y, y_dense, rtol=1e-12, atol=1e-12)
    assert grads.keys() == dense.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, dense[name], rtol=1e-10, atol=1e-12), name
        assert grad.abs().max() > 0, name
    return grads


@pytest.mark.parametrize("layer_name,config_name", CASES)
def test_factored_path_equals_the_dense_path(monkeypatch, layer_name, config_name):
    net, x = adapted_layer(layer_name, {"unit": CONFIGS[config_name]})
    expected = {**dict.fromkeys(LOW_RANK, "_FactoredLayerBackward"), **dict.fromkeys(WITH_BASIS, "_ProductLayerBackward")}
    if config_name in expected:
        assert_paths_agree(monkeypatch, net, x, expected[config_name])
    else:  # dense deltas and biases keep autograd's path
        factored(monkeypatch, True)
        assert type(forward_backward(net, x)[1]).__name__ not in FACTORED


@pytest.mark.parametrize("layer_name", LAYERS)
def test_several_units_on_one_layer_share_the_factored_path_and_gated_off_units_get_nothing(monkeypatch, layer_name):
    """A SEA-PEFT-like layer with LoRA r1 and r2, ConvLoRA (on convolutions), BitFit, SALT and a dense delta, gated
    as an allocator would: the low-rank units share one factored pass; SALT switched on runs the whole layer in its
    basis with the LoRA factors on top; a second singular-value unit (SVD) falls back to the additive factors; a
    dense delta switched on sends the layer back to the dense weight gradient. Gated-off units get no gradient."""
    configs = {"lora1": LoRAConfig(r=1, alpha=1), "lora2": LoRAConfig(r=2, alpha=2), "convlora": ConvLoRAConfig(r=1),
               "bitfit": BitFitConfig(), "salt": SALTConfig(rank=1, lora_rank=1), "svd": SVDConfig(),
               "dense": DenseConfig()}
    if not applicable(layer_name, "convlora"):
        del configs["convlora"]
    net, x = adapted_layer(layer_name, configs)
    layer = net[0]

    def gates(*on):
        for name in configs:
            layer.set_active(name, name in on)

    low_rank = [name for name in ("lora1", "lora2", "convlora", "bitfit") if name in configs]
    for active, node in ((low_rank, "_FactoredLayerBackward"), (low_rank + ["salt"], "_ProductLayerBackward"),
                         (["salt", "lora1"], "_ProductLayerBackward"), (["salt"], "_ProductLayerBackward"),
                         (low_rank + ["salt", "svd"], "_FactoredLayerBackward")):
        gates(*active)
        grads = assert_paths_agree(monkeypatch, net, x, node)
        trained = {name.split(".")[2] for name in grads if name != "input"}
        assert trained == set(active), "exactly the active units get a gradient"
    gates(*low_rank, "salt", "dense")
    factored(monkeypatch, True)
    assert type(forward_backward(net, x)[1]).__name__ not in FACTORED


def test_a_pissa_lora_beside_salt_moves_the_weight_off_salts_basis_and_takes_the_additive_factors(monkeypatch):
    """PiSSA subtracts its principal part from the weight: SALT's SVD is no longer of the weight the layer runs
    with, so the product form (which rebuilds the weight from that SVD) must not be used."""
    net, x = adapted_layer("conv3d_strided", {"pissa": LoRAConfig(r=2, alpha=2, init="pissa"),
                                              "salt": SALTConfig(rank=1, lora_rank=2)})
    assert_paths_agree(monkeypatch, net, x, "_FactoredLayerBackward")


@pytest.mark.parametrize("layer_name", ["conv3d_grouped_dilated", "conv3d_anisotropic"])
def test_convlora_factors_compose_the_papers_view_of_b_a(layer_name):
    """P Q in the (C_out, C_in·kᵈ) matricisation is exactly the reference's ΔW = (α/r)·view(B A), k the kernel's
    first size (an anisotropic kernel's too), and the method counts the unit's parameters as it holds them."""
    from PEFTAdaptLib.methods import make_method

    net, _ = adapted_layer(layer_name, {"unit": ConvLoRAConfig(r=2, alpha=3)})
    layer = net[0]
    unit = layer.units["unit"]
    weight = layer.base.weight
    expected = weight + unit.scaling * (unit.lora_B @ unit.lora_A).view(weight.shape)
    assert torch.allclose(layer.effective_params()["weight"], expected, rtol=1e-13, atol=1e-14)
    held = sum(p.numel() for p in unit.parameters())
    assert make_method("convlora").unit_cost(tuple(weight.shape), 2) == held


class _WeightGradients(TorchDispatchMode):
    """Records the shapes of every tensor produced while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("layer_name", ["linear", "conv3d_strided", "convtranspose3d_grouped"])
def test_the_factored_backward_never_forms_the_dense_weight_gradient(monkeypatch, layer_name):
    for on in (False, True):
        factored(monkeypatch, on)
        net, x = adapted_layer(layer_name, {"lora": LoRAConfig(r=1)})
        weight = net[0].base.weight
        dense_shapes = {tuple(weight.shape), (weight.shape[0], weight[0].numel()), (weight[0].numel(), weight.shape[0])}
        y = net(x.requires_grad_(True))
        with _WeightGradients() as recorder:
            y.square().sum().backward()
        formed = dense_shapes & set(recorder.shapes)
        assert bool(formed) == (not on), (on, formed)


def test_the_cost_rule_is_calibrated_on_the_cpu_and_elsewhere_takes_the_dense_path():
    """A wide 3×3×3 convolution takes the factored and product forms on the CPU; on a GPU the dense weight gradient
    was the faster (bench/gpu_check.py on an H100), and the CPU's constants say nothing of another device."""
    wide = nn.Conv3d(64, 64, 3)
    for device, expected in (("cpu", True), ("cuda", False), ("meta", False)):
        assert lowrank.factored_is_cheaper(wide, 4, torch.device(device)) is expected, device
        assert lowrank.product_is_cheaper(wide, 4, torch.device(device)) is expected, device


def test_training_with_gates_and_a_save_load_resume_matches_the_dense_path(monkeypatch, tmp_path):
    """AdamW steps on a small network with LoRA, ConvLoRA, BitFit and a gated SALT unit; halfway the units are
    saved, loaded into a fresh network and training resumes there: both paths end at the same weights."""

    def network():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.ConvTranspose3d(8, 4, 2, stride=2), nn.ReLU(), nn.Conv3d(4, 2, 1))
        add_units(net, LoRAConfig(r=2, alpha=2), LoRAUnit, "lora")
        add_units(net, ConvLoRAConfig(r=1), ConvLoRAUnit, "convlora", layers=["2"])
        add_units(net, BitFitConfig(), BitFitUnit, "bitfit", layers=["4"])
        add_units(net, SALTConfig(rank=1, lora_rank=1), SALTUnit, "salt", active=False, layers=["2"])
        freeze_base(net)
        return net

    x = torch.randn(2, 2, 6, 6, 6, generator=torch.Generator().manual_seed(5))
    target = torch.randint(0, 2, (2, 6, 6, 6), generator=torch.Generator().manual_seed(6))

    def train(net, optimizer, steps):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(net(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    finals = {}
    for on in (False, True):
        factored(monkeypatch, on)
        net = network()
        optimizer = torch.optim.AdamW(parameter_groups(net, 1e-2))
        train(net, optimizer, 3)
        net[2].set_active("salt", True)  # an allocator switching a unit on: that layer goes dense
        net[0].set_active("lora", False)
        train(net, optimizer, 2)
        folder = tmp_path / f"adapter_{on}"
        save_adapters(net, folder)
        resumed = network()
        load_adapters(resumed, folder)
        again = torch.optim.AdamW(parameter_groups(resumed, 1e-2))
        again.load_state_dict(optimizer.state_dict())
        train(resumed, again, 3)
        finals[on] = {n: p.detach().clone() for n, p in resumed.named_parameters() if p.requires_grad}
    assert finals[True].keys() == finals[False].keys()
    for name, value in finals[True].items():
        assert torch.allclose(value, finals[False][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("units", ["lora_bitfit", "salt_lora"])
@pytest.mark.parametrize("layer_name", ["linear", "conv3d_strided", "convtranspose3d_grouped"])
def test_bf16_autocast_keeps_the_dense_paths_dtypes_and_accuracy(monkeypatch, layer_name, units):
    """Under CPU bf16 autocast (the GPU path's dtype rules, on the CPU) both paths run the layer in bf16 and give
    float32 parameter gradients; against the float32 gradients, the factored path's (or the product form's) bf16
    error is no worse than the dense path's (within a factor 2)."""
    configs = {"lora_bitfit": {"lora": LoRAConfig(r=2, alpha=2), "bitfit": BitFitConfig()},
               "salt_lora": {"salt": SALTConfig(rank=1, lora_rank=2), "lora": LoRAConfig(r=2, alpha=2)}}[units]
    node_name = {"lora_bitfit": "_FactoredLayerBackward", "salt_lora": "_ProductLayerBackward"}[units]
    net, x = adapted_layer(layer_name, configs, dtype=torch.float32)
    factored(monkeypatch, True)
    _, _, exact = forward_backward(net, x)
    errors = {}
    for on in (False, True):
        factored(monkeypatch, on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, node, grads = forward_backward(net, x)
        assert y.dtype == torch.bfloat16
        assert (type(node).__name__ == node_name) == on
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, name
        errors[on] = max(float((grads[n] - exact[n]).norm() / exact[n].norm()) for n in grads)
    assert errors[False] < 0.05
    assert errors[True] <= 2 * errors[False] + 1e-3, errors


class _ScaledConv(nn.Conv2d):
    """A subclass with its own forward: the factored path cannot know what it does."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding="same"), lambda: _ScaledConv(4, 6, 3)],
                         ids=["string_padding", "subclass_with_its_own_forward"])
def test_layers_the_factored_path_cannot_reproduce_keep_the_dense_path(monkeypatch, make):
    torch.manual_seed(0)
    net = nn.Sequential(make())
    reference = copy.deepcopy(net)
    apply_adapter(net, LoRAConfig(r=2), "lora")
    freeze_base(net)
    factored(monkeypatch, True)
    x = torch.randn(1, 4, 7, 7)
    y = net(x)
    assert type(y.grad_fn).__name__ != "_FactoredLayerBackward"
    assert torch.allclose(y, reference(x), atol=1e-6)  # B = 0: the layer's own function, its own forward


def test_autocast_dtype_is_read_with_the_api_of_older_torch_too(monkeypatch):
    """torch < 2.4 has no `get_autocast_dtype(device)`: the per-device functions give the same answer."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        current = lowrank._autocast_dtype("cpu")
        monkeypatch.delattr(torch, "get_autocast_dtype")
        legacy = lowrank._autocast_dtype("cpu")
    assert current == legacy == torch.bfloat16
    assert lowrank._autocast_dtype("cpu") is None


@pytest.mark.parametrize("configs,tolerance", [
    ({"lora": LoRAConfig(r=4, alpha=4)}, 1e-4),
    # float32 SALT gradients through the dense weight gradient are the inexact side: against float64, up to 17 % off
    # on single singular values of deepbet (the projection Uᵀ dW V cancels), the product form's within 1e-4
    ({"salt": SALTConfig(ratio=0.1, lora_rank=2), "lora": LoRAConfig(r=2, alpha=2)}, 1e-2),
], ids=["lora", "salt_with_lora"])
def test_supervised_training_through_the_trainer_is_the_same_on_both_paths(monkeypatch, configs, tolerance):
    """The product's supervised trainer on the real deepbet network and a real BraTS volume (64³ patches, 2 AdamW
    steps, the same seeds), every layer forced onto the factored paths (LoRA: the factored backward; SALT with LoRA
    on top: the product form) and onto the dense weight gradient: the same losses, audits and adapter tensors, to
    float32 round-off."""
    from PEFTAdaptLib.data.cases import load_case
    from PEFTAdaptLib.models.deepbet import load_deepbet
    from PEFTAdaptLib.training import TrainConfig, supervised_trainer

    from conftest import shared

    card = dataclasses.replace(load_deepbet().card, patch_size=(64, 64, 64), inference_roi=(64, 64, 64))
    brats = "brats/brats_2013_pat0003_1"
    case = load_case([shared(f"{brats}/T1c_subtrMeanDivStd.nii.gz")], card, shared(f"{brats}/brainmask.nii.gz"))
    runs = {}
    for on in (False, True):
        factored(monkeypatch, on)
        network = load_deepbet().network
        torch.manual_seed(0)  # the units' initialisation
        for name, config in configs.items():
            apply_adapter(network, copy.deepcopy(config), name)
        trainer = supervised_trainer(network, card, [case], [case],
                                     TrainConfig(steps=2, lr=1e-3, patches_per_step=1, audit_every=100, seed=0))
        nodes = set()  # how the adapted layers ran in training
        for _, layer in adapted_layers(network):
            layer.register_forward_hook(lambda module, args, y: nodes.add(type(y.grad_fn).__name__))
        trainer.run()
        path = "_ProductLayerBackward" if "salt" in configs else "_FactoredLayerBackward"
        assert (path in nodes) == on, nodes
        runs[on] = (trainer.losses, [score for _, score in trainer.history],
                    {f"{r.layer}.{r.name}.{k}": v.detach().clone() for r in iter_units(network)
                     for k, v in r.unit.named_parameters()})
    (losses, scores, units), (losses_f, scores_f, units_f) = runs[False], runs[True]
    assert losses_f == pytest.approx(losses, rel=1e-5) and scores_f == pytest.approx(scores, abs=1e-3)
    assert units_f.keys() == units.keys()
    for name, value in units_f.items():
        assert float((value - units[name]).norm()) <= tolerance * float(units[name].norm()), name
