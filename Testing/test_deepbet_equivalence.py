"""The eager LinkNet3d reproduces deepbet's shipped TorchScript network."""
import torch

from PEFTAdaptLib.models.deepbet import deepbet_weights_path
from PEFTAdaptLib.models.linknet3d import load_from_torchscript


def test_eager_network_matches_shipped_torchscript():
    scripted = torch.jit.load(str(deepbet_weights_path()), map_location="cpu")
    eager = load_from_torchscript(str(deepbet_weights_path()))
    torch.manual_seed(0)
    x = torch.rand(1, 1, 64, 96, 64) * 2.0 - 0.5
    with torch.no_grad():
        expected = scripted(x)  # the scripted model returns softmax probabilities
        actual = torch.softmax(eager(x), dim=1)
    assert expected.shape == actual.shape == (1, 2, 64, 96, 64)
    assert (expected - actual).abs().max().item() <= 1e-5
    # the network does something input-dependent (not a constant map)
    assert expected[:, 1].std() > 1e-3


def test_eager_network_has_every_weight_of_the_checkpoint():
    scripted = torch.jit.load(str(deepbet_weights_path()), map_location="cpu")
    eager = load_from_torchscript(str(deepbet_weights_path()))
    assert set(scripted.state_dict()) == set(eager.state_dict())
    assert sum(p.numel() for p in eager.parameters()) == 2_126_258
