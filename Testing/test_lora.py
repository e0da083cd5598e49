"""Weight-space LoRA: identity at initialisation and equal to HF peft's LoRA for the same weights, outputs and
gradients (on the dense and the factored backward)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from PEFTAdaptLib.adapters import LoRAConfig, LoRAUnit, add_units, count_trainable, freeze_base, lowrank


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3, 4)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoLayer()


def test_lora_is_identity_at_initialisation(model):
    x = torch.randn(2, 3, 8, 8, 8)
    expected = model(x)
    adapted = copy.deepcopy(model)
    add_units(adapted, LoRAConfig(r=2, alpha=4), LoRAUnit, "lora")
    assert (adapted(x) - expected).abs().max().item() <= 1e-6


def peft_and_ours(model):
    """HF peft's LoRA and ours on the same layers, with the same (non-zero) factors."""
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"]))
    ours = copy.deepcopy(model)
    add_units(ours, LoRAConfig(r=2, alpha=4, target_modules=("conv", "fc")), LoRAUnit, "lora")
    freeze_base(ours)
    torch.manual_seed(1)
    pairs = {}
    with torch.no_grad():
        for name in ("conv", "fc"):
            layer = theirs.base_model.model.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.normal_()  # B is zero at init: make the comparison non-trivial
            unit = ours.get_submodule(name).units["lora"]
            unit.lora_A.copy_(a.reshape(a.shape[0], -1))
            unit.lora_B.copy_(b.reshape(b.shape[0], -1))
            pairs[name] = ((a, unit.lora_A), (b, unit.lora_B))
    return theirs, ours, pairs


def test_lora_matches_hf_peft_on_conv3d_and_linear(model):
    theirs, ours, _ = peft_and_ours(model)
    x = torch.randn(2, 3, 8, 8, 8)
    expected, actual = theirs(x), ours(x)
    assert (expected - model(x)).abs().max() > 1e-3  # the adapters change the output
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert count_trainable(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("factored", [False, True], ids=["dense_path", "factored_path"])
def test_lora_gradients_match_hf_peft(model, monkeypatch, factored):
    monkeypatch.setattr(lowrank, "FORCE", "factored" if factored else "dense")
    theirs, ours, pairs = peft_and_ours(model)
    x = torch.randn(2, 3, 8, 8, 8)
    for net in (theirs, ours):
        net(x).square().sum().backward()
    assert (type(ours.fc(torch.randn(2, 5)).grad_fn).__name__ == "_FactoredLayerBackward") == factored
    for name, ((a, our_a), (b, our_b)) in pairs.items():
        assert torch.allclose(our_a.grad, a.grad.reshape(our_a.shape), rtol=1e-4, atol=1e-6), name
        assert torch.allclose(our_b.grad, b.grad.reshape(our_b.shape), rtol=1e-4, atol=1e-6), name


def test_only_lora_parameters_train(model):
    add_units(model, LoRAConfig(r=2), LoRAUnit, "lora")
    freeze_base(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".units.lora." in n for n in trainable)
    # closed form: r·(C_in·k³ + C_out) for the conv, r·(in + out) for the linear
    assert count_trainable(model) == 2 * (3 * 27 + 5) + 2 * (5 + 4)
