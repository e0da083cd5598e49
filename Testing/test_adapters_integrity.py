"""An adapter file means the same thing wherever it is loaded: SALT/SVD bases that do not depend on how an SVD
routine picks signs or bases of equal singular values, and a fingerprint taken from the model being loaded onto."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from PEFTAdaptLib.adapters import (
    BitFitConfig, LoRAConfig, NormAffineConfig, SALTConfig, SVDConfig, apply_adapter, fingerprint, freeze_base,
    iter_units, load_adapters, merge_all, save_adapters, unmerge_all,
)
from PEFTAdaptLib.errors import ModelError

X = torch.randn(2, 3, 5, 5, 5, generator=torch.Generator().manual_seed(4))


class Net(nn.Module):
    """A conv whose weight has repeated and zero singular values, a bias-less conv, a plain instance norm, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, padding=1)
        self.plain = nn.Conv3d(6, 4, 1, bias=False)
        self.inorm = nn.InstanceNorm3d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inorm(self.plain(torch.relu(self.conv(x))))
        return self.fc(h.amax(dim=(2, 3, 4)))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # filters on disjoint taps, so the spectrum is exact in float32: σ = 2, 2, √2, √2, 0, 0
        weight = net.conv.weight.view(6, -1)
        weight.zero_()
        weight[0, 0:4] = torch.tensor([1.0, 1.0, 1.0, 1.0])
        weight[1, 4:8] = torch.tensor([1.0, -1.0, 1.0, -1.0])
        weight[2, 8:16] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, -0.5])
        weight[3, 8:16] = torch.tensor([0.5, 0.5, 0.5, 0.5, -0.5, 0.5, -0.5, 0.5])
    return net.eval()  # filters 4 and 5 are dead


def perturbed(config) -> Net:
    net = make_net()
    apply_adapter(net, config, "unit")
    freeze_base(net)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for record in iter_units(net):
            for p in record.unit.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return net


def scrambled_svd(original):
    """An SVD as another LAPACK may return it: pairs with flipped signs, and equal singular values (zero ones
    included) with their vectors rotated inside their group. Every result is still an exact SVD."""

    def svd(matrix, full_matrices=True, **kwargs):
        u, s, vh = original(matrix, full_matrices=full_matrices, **kwargs)
        u, vh = u.clone(), vh.clone()
        signs = torch.tensor([(-1.0) ** i for i in range(s.numel())], dtype=u.dtype)
        u, vh = u * signs, vh * signs[:, None]
        groups, start = [], 0
        for i in range(1, s.numel() + 1):
            if i == s.numel() or abs(float(s[i - 1] - s[i])) > 1e-6 * float(s[0]):
                groups.append(slice(start, i))
                start = i
        for group in groups:
            width = group.stop - group.start
            if width > 1:
                angle = torch.tensor(0.7, dtype=u.dtype)
                rotation = torch.eye(width, dtype=u.dtype)
                rotation[:2, :2] = torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                                                torch.stack([angle.sin(), angle.cos()])])
                u[:, group] = u[:, group] @ rotation
                vh[group] = rotation.T @ vh[group]
        return u, s, vh

    return svd


@pytest.mark.parametrize("config", [SALTConfig(rank=1, lora_rank=2), SVDConfig()], ids=["salt", "svd"])
def test_a_singular_value_adapter_loads_the_same_under_another_svd_routine(tmp_path, monkeypatch, config):
    net = perturbed(config)
    expected = net(X)
    assert (expected - make_net()(X)).abs().max() > 1e-2, "the trained units change the output"
    save_adapters(net, tmp_path / "adapter")
    monkeypatch.setattr(torch.linalg, "svd", scrambled_svd(torch.linalg.svd))
    fresh = make_net()
    load_adapters(fresh, tmp_path / "adapter")
    assert torch.allclose(fresh(X), expected, rtol=1e-5, atol=1e-6)


def test_the_scrambled_svd_is_an_svd_with_repeated_and_zero_singular_values():
    """The test above only means something if the conv's spectrum has groups for the scrambling to rotate."""
    weight = make_net().conv.weight.detach().reshape(6, -1).double()
    u, s, vh = scrambled_svd(torch.linalg.svd)(weight, full_matrices=False)
    assert torch.allclose((u * s) @ vh, weight, atol=1e-12)
    assert torch.allclose(s, torch.tensor([2, 2, 2 ** 0.5, 2 ** 0.5, 0, 0], dtype=s.dtype), atol=1e-12)


def test_loading_onto_another_network_is_refused_whatever_fingerprint_the_caller_passes(tmp_path):
    net = perturbed(LoRAConfig(r=2))
    save_adapters(net, tmp_path / "adapter", fingerprint(make_net()))
    other = make_net()
    with torch.no_grad():
        other.fc.weight.add_(1e-3)
    stale = fingerprint(make_net())  # the right base's fingerprint, recorded earlier: a stale or forged claim
    with pytest.raises(ModelError, match="different base model"):
        load_adapters(other, tmp_path / "adapter", stale)
    with pytest.raises(ModelError, match="different base model"):
        load_adapters(other, tmp_path / "adapter")
    # the right network loads, and a caller's record that no longer fits it is refused
    load_adapters(make_net(), tmp_path / "adapter")
    with pytest.raises(ModelError, match="changed since it was fingerprinted"):
        load_adapters(make_net(), tmp_path / "adapter", fingerprint(other))


@pytest.mark.parametrize("config", [LoRAConfig(r=2), BitFitConfig(), NormAffineConfig()],
                         ids=["lora", "bitfit_adds_a_bias", "norm_affine_adds_an_affine"])
def test_the_fingerprint_is_the_base_networks_whether_adapted_merged_or_unmerged(config):
    base = fingerprint(make_net())
    net = perturbed(config)
    assert fingerprint(net) == base
    merge_all(net)
    assert fingerprint(net) == base
    unmerge_all(net)
    assert fingerprint(net) == base
