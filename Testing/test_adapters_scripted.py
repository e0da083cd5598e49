"""Weight-space LoRA on deepbet's shipped TorchScript file equals LoRA on its eager twin: outputs and gradients."""
import torch

from PEFTAdaptLib.adapters import LoRAConfig, LoRAUnit, add_units
from PEFTAdaptLib.adapters.scripted import ScriptedAdapterModel
from PEFTAdaptLib.models.deepbet import deepbet_weights_path
from PEFTAdaptLib.models.linknet3d import load_from_torchscript


def test_scripted_lora_matches_eager_lora_in_outputs_and_gradients():
    path = str(deepbet_weights_path())
    config = LoRAConfig(r=2, alpha=2, target_modules=("down1.*", "up3.*", "tp_conv2"))
    scripted = ScriptedAdapterModel(torch.jit.load(path, map_location="cpu"), config, LoRAUnit)
    eager = load_from_torchscript(path)
    records = {r.layer: r.unit for r in add_units(eager, config, LoRAUnit, "lora")}
    assert sorted(records) == sorted(scripted.layer_names) and len(records) == 9
    torch.manual_seed(0)
    with torch.no_grad():
        for name, unit in records.items():
            twin = scripted.units[name.replace(".", "__")]
            twin.lora_B.normal_(std=0.02)
            unit.lora_A.copy_(twin.lora_A)
            unit.lora_B.copy_(twin.lora_B)
    x = torch.rand(1, 1, 64, 64, 64)
    weights = torch.rand(1, 2, 64, 64, 64)
    ours = scripted(x)  # scripted deepbet returns probabilities
    theirs = torch.softmax(eager(x), dim=1)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - torch.jit.load(path, map_location="cpu")(x)).abs().max() > 1e-4  # the adapters act

    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for name, unit in records.items():
        twin = scripted.units[name.replace(".", "__")]
        for ours_grad, theirs_grad in ((twin.lora_A.grad, unit.lora_A.grad), (twin.lora_B.grad, unit.lora_B.grad)):
            scale = theirs_grad.abs().max().clamp(min=1e-12)
            assert ((ours_grad - theirs_grad).abs().max() / scale) <= 1e-3, name
    # the scripted model's own weights collect no gradient: only θ would be trained
    assert all(p.grad is None for p in scripted.scripted.parameters())
    assert sum(p.numel() for p in scripted.units.parameters()) == sum(u.num_trainable() for u in records.values())
