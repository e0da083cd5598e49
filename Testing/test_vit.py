"""ViTs: LoRA on the query and value rows of a fused qkv projection equals LoRA on separate q and v projections
(ours and HF peft's), trains only those rows; MONAI ViT/UNETR (2D and 3D) in the lora-qv method and SEA-PEFT's pool."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import UNETR, ViT
from peft import LoraConfig, get_peft_model

from PEFTAdaptLib.adapters import (
    LoRAConfig, QKVLoRAConfig, apply_adapter, count_trainable, iter_units, load_adapters, merge_all, save_adapters,
)
from PEFTAdaptLib.methods import BuildContext, Cases, make_method
from PEFTAdaptLib.seapeft import build_pool

HIDDEN, HEADS = 48, 4


def fused_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(1, (32, 32), (8, 8), hidden_size=HIDDEN, mlp_dim=96, num_layers=2, num_heads=HEADS, spatial_dims=2,
               qkv_bias=True)


def split_copy(vit: ViT) -> ViT:
    """The same ViT with separate q, k, v projections (MONAI's SABlock without a combined linear), same weights."""
    split = copy.deepcopy(vit)
    for block in split.blocks:
        fused = block.attn
        attention = SABlock(HIDDEN, HEADS, qkv_bias=True, use_combined_linear=False)
        with torch.no_grad():
            for index, name in enumerate(("to_q", "to_k", "to_v")):
                rows = slice(index * HIDDEN, (index + 1) * HIDDEN)
                getattr(attention, name).weight.copy_(fused.qkv.weight[rows])
                getattr(attention, name).bias.copy_(fused.qkv.bias[rows])
            attention.out_proj.load_state_dict(fused.out_proj.state_dict())
        block.attn = attention
    return split


def fused_units(model):
    return {r.layer.removesuffix(".attn.qkv"): r.unit for r in iter_units(model)}


def same_lora(fused_model, split_named_pairs):
    """Give the fused units the (A, B) of the separate q/v LoRA, with B random so the delta is not zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for block, unit in fused_units(fused_model).items():
            for part in "qv":
                a, b = split_named_pairs[f"{block}.attn.to_{part}"]
                b.copy_(torch.randn_like(b) * 0.1)
                unit.parts[part].lora_A.copy_(a)
                unit.parts[part].lora_B.copy_(b)


def output(model, x):
    return model(x)[0]


@pytest.fixture
def pair():
    fused = fused_vit()
    split = split_copy(fused)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(output(fused, x), output(split, x), atol=1e-6)
    apply_adapter(fused, QKVLoRAConfig(r=2, alpha=4, parts="qv", target_modules=["*.attn.qkv"]))
    records = apply_adapter(split, LoRAConfig(r=2, alpha=4, target_modules=["*.attn.to_q", "*.attn.to_v"]))
    same_lora(fused, {r.layer: (r.unit.lora_A, r.unit.lora_B) for r in records})
    return fused, split, x


def test_qv_lora_on_a_fused_qkv_equals_lora_on_separate_q_and_v(pair):
    fused, split, x = pair
    assert torch.allclose(output(fused, x), output(split, x), atol=1e-6)
    assert count_trainable(fused) == count_trainable(split) == 2 * 2 * 2 * (HIDDEN + HIDDEN)
    # and stays equal through training: the same AdamW steps on the same loss
    target = torch.randn_like(output(fused, x))
    for model in (fused, split):
        units = [p for r in iter_units(model) for p in r.unit.parameters()]
        optimizer = torch.optim.AdamW(units, lr=1e-2)
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(output(model, x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.allclose(output(fused, x), output(split, x), atol=1e-5)


def test_qv_lora_on_a_fused_qkv_moves_only_the_query_and_value_rows(pair):
    fused, _, x = pair
    original = [block.attn.qkv.base.weight.detach().clone() for block in fused.blocks]
    units = [p for r in iter_units(fused) for p in r.unit.parameters()]
    output(fused, x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in units)
    assert {name.split(".")[-2] for r in iter_units(fused) for name, _ in r.unit.named_parameters()} == {"q", "v"}
    merge_all(fused)
    for block, before in zip(fused.blocks, original):
        after = block.attn.qkv.base.weight
        q, k, v = (slice(i * HIDDEN, (i + 1) * HIDDEN) for i in range(3))
        assert torch.equal(after[k], before[k])  # the keys are untouched, bit for bit
        assert not torch.allclose(after[q], before[q]) and not torch.allclose(after[v], before[v])


def test_qv_lora_on_a_fused_qkv_equals_hf_peft_on_separate_projections(pair):
    fused, split, x = pair
    theirs = get_peft_model(split_copy(fused_vit()), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for block, unit in fused_units(fused).items():
            for part in "qv":
                layer = theirs.base_model.model.get_submodule(f"{block}.attn.to_{part}")
                layer.lora_A["default"].weight.copy_(unit.parts[part].lora_A)
                layer.lora_B["default"].weight.copy_(unit.parts[part].lora_B)
    assert torch.allclose(output(fused, x), output(theirs, x), atol=1e-6)


def test_a_fused_qkv_adapter_saves_and_loads(pair, tmp_path):
    fused, _, x = pair
    expected = output(fused, x)
    save_adapters(fused, tmp_path)  # fingerprint of the base network itself
    fresh = fused_vit()
    load_adapters(fresh, tmp_path)
    assert torch.allclose(output(fresh, x), expected, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_lora_qv_method_on_monai_unetr_adapts_only_query_and_value(dims):
    network = UNETR(1, 2, (32,) * dims, feature_size=8, hidden_size=HIDDEN, mlp_dim=96, num_heads=HEADS,
                    spatial_dims=dims)
    method = make_method("lora-qv", rank=4)
    total = sum(p.numel() for p in network.parameters())
    x = torch.randn(1, 1, *(32,) * dims)
    reference = network(x)
    plan = method.build(BuildContext(network, None, total, 1e-3, 1, 1, 0, "cpu", Cases([], [], []), lambda e: None))
    layers = {r.layer for r in iter_units(network)}
    assert layers == {f"vit.blocks.{i}.attn.qkv" for i in range(12)}
    assert count_trainable(network) == method.cost(network, 4) == 12 * 2 * 4 * (HIDDEN + HIDDEN)
    assert plan.rank == 4 and torch.allclose(network(x), reference, atol=1e-6)
    # without a rank, the largest that fits the budget (here the cost of rank 2)
    from PEFTAdaptLib.methods import Budget

    budget = Budget.parse(str(method.cost(network, 2)))
    fresh = UNETR(1, 2, (32,) * dims, feature_size=8, hidden_size=HIDDEN, mlp_dim=96, num_heads=HEADS,
                  spatial_dims=dims)
    plan = make_method("lora-qv", budget=budget).build(
        BuildContext(fresh, SimpleNamespace(extra={}), total, 1e-3, 1, 1, 0, "cpu", Cases([], [], []),
                     lambda e: None))
    assert plan.rank == 2 and count_trainable(fresh) == method.cost(network, 2)


def test_lora_qv_refuses_a_model_without_attention():
    from monai.networks.nets import UNet

    from PEFTAdaptLib.methods import MethodError

    network = UNet(2, 1, 2, (4, 8), (2,))
    with pytest.raises(MethodError, match="no attention query/value projection"):
        make_method("lora-qv", rank=2).build(BuildContext(network, None, 1000, 1e-3, 1, 1, 0, "cpu",
                                                          Cases([], [], []), lambda e: None))


@pytest.mark.parametrize("dims", [2, 3])
def test_sea_peft_pool_on_a_vit_has_qv_lora_on_qkv_and_lora_on_the_mlp(dims):
    vit = ViT(1, (16,) * dims, (8,) * dims, hidden_size=HIDDEN, mlp_dim=96, num_layers=2, num_heads=HEADS,
              spatial_dims=dims)
    x = torch.randn(1, 1, *(16,) * dims)
    reference = vit(x)[0]
    pool = build_pool(vit, families=("lora", "lora_qv", "adaptformer"))
    by_site = {}
    for unit in pool:
        by_site.setdefault(unit.site, set()).add(unit.unit)
    for block in range(2):
        assert {"sea_lora_qv_r1", "sea_lora_qv_r4", "sea_lora_r1"} <= by_site[f"blocks.{block}.attn.qkv"]
        assert "sea_lora_r2" in by_site[f"blocks.{block}.mlp.linear1"]
        assert not any(u.startswith("sea_lora_qv") for u in by_site[f"blocks.{block}.mlp.linear1"])
    assert not any(site.endswith("out_proj") for site in by_site)  # not an attention input nor an MLP site
    qv = next(u for u in pool if u.unit == "sea_lora_qv_r4")
    assert qv.cost == 2 * 4 * (HIDDEN + HIDDEN)
    for record in iter_units(vit):
        record.owner.set_active(record.name, True)
    assert torch.allclose(vit(x)[0], reference, atol=1e-5)


def test_a_vit_bundle_is_fed_inputs_of_its_fixed_size(tmp_path):
    """UNETR's position embeddings fix its input size: the card says so, a smaller image is padded up to the ROI
    for inference, and SEA-PEFT's audit buffer uses patches rather than one whole-image pass."""
    import json

    import numpy as np

    from PEFTAdaptLib.data.cases import Case
    from PEFTAdaptLib.inference import predict_probabilities
    from PEFTAdaptLib.models.monai_bundle import build_network, bundle_card
    from PEFTAdaptLib.seapeft.audit import AuditBuffer

    (tmp_path / "configs").mkdir()
    network_def = {"_target_": "UNETR", "in_channels": 1, "out_channels": 2, "img_size": [32, 32], "feature_size": 8,
                   "hidden_size": HIDDEN, "mlp_dim": 96, "num_heads": HEADS, "spatial_dims": 2}
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": network_def, "inferer": {"roi_size": [32, 32]}}))
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(
        {"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "tumour"}}}}}))
    card, network = bundle_card(tmp_path), build_network(tmp_path)
    assert card.spatial_dims == 2 and card.extra["fixed_input_size"]
    small = np.random.default_rng(0).normal(size=(1, 20, 40)).astype(np.float32)
    assert predict_probabilities(network, small, card).shape == (2, 20, 40)
    label = np.zeros((1, 48, 40), np.uint8)
    label[0, 10:20, 10:20] = 1
    case = Case("c", None, None, np.random.default_rng(1).normal(size=(1, 48, 40)).astype(np.float32), label)
    buffer = AuditBuffer([case], card.patch_size, 4, 0, whole=False)
    assert all(image.shape[2:] == (32, 32) for image, _, _ in buffer.batches)
    assert 0 <= buffer.dice(network) <= 1
