"""SEA-PEFT on real networks: the pool, the first-order estimate, the hook inside the engine's trainer
(determinism, resume, events) and one real worker run (deepbet on a BraTS T1c volume)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from conftest import shared
from PEFTAdaptLib.adapters import UNIT_TYPES, freeze_base, iter_units, load_adapters, save_adapters
from PEFTAdaptLib.data.cases import prepare_case
from PEFTAdaptLib.errors import PEFTAdaptError
from PEFTAdaptLib.jobs.runstate import RunState
from PEFTAdaptLib.models.card import LabelInfo, ModelCard
from PEFTAdaptLib.seapeft import SeaPeftConfig, SeaPeftHook, build_pool, build_sea_peft, site_kinds
from PEFTAdaptLib.seapeft.audit import AuditBuffer
from PEFTAdaptLib.training import TrainConfig, supervised_trainer

CARD = ModelCard(id="test-spine", title="", description="", modality="MR", input_channels=1, spacing=(1.0, 1.0, 1.0),
                 orientation="RAS", normalization={"name": "percentile_zscore"}, patch_size=(16, 16, 16),
                 inference_roi=(32, 32, 32), labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")], license="",
                 source="", divisible_by=4)


def spine_slab(z0: int, z1: int):
    """A real spinal-cord T1 slab with its manual cord mask (small: fast tests)."""
    image = sitk.ReadImage(str(shared("spine/t1/t1w.nii.gz")), sitk.sitkFloat32)[:, :, z0:z1]
    label = sitk.Cast(sitk.ReadImage(str(shared("spine/t1/t1w_seg-manual.nii.gz"))) > 0.5, sitk.sitkUInt8)[:, :, z0:z1]
    label.CopyInformation(image)
    return prepare_case(f"t1_{z0}", [image], CARD, label)


def small_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 6, 3, padding=1)
        self.norm = nn.InstanceNorm3d(6)
        self.conv2 = nn.Conv3d(6, 6, 3, padding=1)
        self.head = nn.Conv3d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x))))))


class Block(nn.Module):
    """A pre-norm transformer block with the usual names (attn.qkv, attn.proj, mlp.fc1/fc2)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v)
        x = x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.norm2(x))))
        return self.head(x)


# -- pool ------------------------------------------------------------------------------------------------------------
def test_pool_covers_every_site_and_family_with_exact_costs_and_leaves_the_network_unchanged():
    net = small_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    reference = net(x)
    sites = site_kinds(net)
    pool = build_pool(net)
    records = {f"{r.layer}::{r.name}": r for r in iter_units(net)}
    assert set(records) == {u.name for u in pool}
    assert not any(r.active for r in records.values()), "the pool starts inactive"
    assert all(u.cost == records[u.name].unit.num_trainable() > 0 for u in pool)
    families = {u.family for u in pool}
    assert families == {"lora", "convlora", "salt", "bitfit", "norm_affine", "dense"}  # no Linear: no AdaptFormer
    for site, kind in sites.items():
        mine = {u.unit for u in pool if u.site == site}
        if kind == "norm":
            assert mine == {"sea_norm_affine"}
        else:
            assert {"sea_lora_r1", "sea_lora_r2", "sea_lora_r4", "sea_salt_r2", "sea_bitfit", "sea_dense"} <= mine
            cubic = records[f"{site}::sea_lora_r1"].owner.base.weight.shape[2] > 1
            assert ("sea_convlora_r1" in mine) == (cubic and kind == "conv")
    assert torch.equal(net(x), reference)
    for record in records.values():  # every unit alone starts as an identity (the first-order premise)
        record.owner.set_active(record.name, True)
    assert torch.allclose(net(x), reference, atol=1e-5)
    cheap = build_pool(small_unet(), max_cost=200)
    assert cheap and all(u.cost <= 200 for u in cheap) and len(cheap) < len(pool)
    dense = {u.site for u in cheap if u.family == "dense"}  # a whole layer's weight: only the small layers fit
    assert dense and dense == {s for s, k in sites.items()
                               if k != "norm" and records[f"{s}::sea_dense"].unit.num_trainable() <= 200}


def test_transformer_pool_uses_attention_qkv_and_mlp_sites():
    from monai.networks.nets import SwinUNETR

    swin = SwinUNETR(1, 2, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), feature_size=12, window_size=4)
    pool = build_pool(swin, families=("lora", "adaptformer", "norm_affine"))
    linear_sites = {u.site for u in pool if u.site_kind in ("attn_qkv", "mlp", "linear")}
    assert linear_sites and all(s.endswith((".attn.qkv", ".mlp.linear1", ".mlp.linear2")) for s in linear_sites)
    assert len([s for s in linear_sites if s.endswith("attn.qkv")]) == 4
    assert {u.family for u in pool if u.site_kind == "attn_qkv"} == {"lora", "adaptformer"}
    assert any(u.site_kind == "norm" and ".blocks.0.norm1" in u.site for u in pool)
    assert not any(u.site.endswith((".attn.proj", "downsample.reduction")) for u in pool)
    block = Block()
    x = torch.randn(2, 5, 8)
    reference = block(x)
    pool = build_pool(block)
    assert {u.site_kind for u in pool} == {"attn_qkv", "mlp", "norm"}  # head and proj are not transformer sites
    for record in iter_units(block):
        record.owner.set_active(record.name, True)
    assert torch.allclose(block(x), reference, atol=1e-5)


def test_the_pool_is_built_from_the_adapter_kinds_registered_now():
    salt = UNIT_TYPES.pop("salt")
    try:
        pool = build_pool(Tiny())
    finally:
        UNIT_TYPES["salt"] = salt
    assert pool and "salt" not in {u.family for u in pool}
    assert "salt" in {u.family for u in build_pool(Tiny())}


# -- first-order estimate --------------------------------------------------------------------------------------------
def _buffer_case(seed: int, invert: bool = False):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.3, (1, 16, 16, 16)).astype(np.float32)
    label = np.zeros((1, 16, 16, 16), np.uint8)
    c = rng.integers(5, 11, 3)
    label[0, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 1
    image[label == 1] += -1.0 if invert else 1.0
    return SimpleNamespace(array=image, label=label)


def test_first_order_estimate_matches_the_hand_computed_value_and_leaves_gates_off():
    torch.manual_seed(0)
    net = Tiny()
    pool = build_pool(net, families=("lora", "salt", "norm_affine", "bitfit", "dense"))
    freeze_base(net)
    hook = SeaPeftHook(net, pool, SeaPeftConfig(budget=10_000, lr=1e-3, allocate_every=20))
    hook.buffer = AuditBuffer([_buffer_case(0)], (16, 16, 16), 2, seed=0)
    events = []
    hook._estimate(0, SimpleNamespace(emit=events.append))
    assert len(events) == len(pool) and {e["estimate"] for e in events} == {"first_order"}
    assert not any(r.active for r in hook.records.values()), "estimation leaves every gate off"
    gains = {e["unit"]: e["delta_dice"] for e in events}
    assert all(g > 0 for g in gains.values()), "every identity-initialised unit has a gradient: never 0"
    for name in ("conv1::sea_lora_r1", "norm::sea_norm_affine", "head::sea_salt_r2", "conv2::sea_dense"):
        hook._gate(name, True)
        value = hook.buffer._pooled(net)
        grads = torch.autograd.grad(value, list(hook.records[name].unit.parameters()), allow_unused=True)
        hook._gate(name, False)
        lr = 1e-3 * (1 / 3 if name.endswith("dense") else 1)  # a dense delta trains at a third of the rate
        expected = lr * 20 * sum(float(g.abs().sum()) for g in grads if g is not None)
        assert gains[name] == pytest.approx(min(expected, 1 - float(value.detach())), rel=1e-4)


def test_first_order_estimates_rank_units_by_the_gain_they_then_realise():
    """Train each unit alone for k Adam steps on the audit objective; the first-order estimates must order the
    units like the Dice gains they realise (Spearman ρ > 0.6). The reference's value for all of them: 0."""
    from scipy.stats import spearmanr

    torch.manual_seed(1)
    source = Tiny()
    optimizer = torch.optim.Adam(source.parameters(), 1e-2)
    train = AuditBuffer([_buffer_case(s) for s in range(4)], (16, 16, 16), 2, seed=0)
    for _ in range(60):  # a small source model on bright blobs ...
        loss = 1 - train._pooled(source)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    target = AuditBuffer([_buffer_case(10, invert=True)], (16, 16, 16), 2, seed=0)  # ... meets dark blobs
    lr, k = 3e-3, 10
    net = copy.deepcopy(source)
    pool = build_pool(net, families=("lora", "salt", "norm_affine", "bitfit"))
    freeze_base(net)
    hook = SeaPeftHook(net, pool, SeaPeftConfig(budget=10_000, lr=lr, allocate_every=k))
    hook.buffer = target
    events = []
    hook._estimate(0, SimpleNamespace(emit=events.append))
    estimated = {e["unit"]: e["delta_dice"] for e in events}
    base = target.dice(net)
    realised = {}
    for unit in pool:
        trial = copy.deepcopy(net)
        record = next(r for r in iter_units(trial) if f"{r.layer}::{r.name}" == unit.name)
        record.owner.set_active(record.name, True)
        optimizer = torch.optim.Adam(record.unit.parameters(), lr)
        for _ in range(k):
            loss = 1 - target._pooled(trial)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        realised[unit.name] = target.dice(trial) - base
    names = sorted(estimated)
    rho = spearmanr([estimated[n] for n in names], [realised[n] for n in names]).statistic
    assert rho > 0.6, f"Spearman {rho:.2f}"


# -- the audit buffer and the first allocation ------------------------------------------------------------------------
class BrightIsCord(nn.Module):
    """A fixed 'network' that calls every bright voxel foreground: on a real T1 slab it also marks bright tissue
    far from the cord (false positives that a couple of patches need not see)."""

    def forward(self, x):
        score = 4.0 * (x - 0.5)
        return torch.cat([-score, score], dim=1)


def test_the_audit_buffer_is_the_whole_audit_volume_where_it_fits_so_every_false_positive_counts():
    from dataclasses import replace

    from PEFTAdaptLib.seapeft.audit import soft_dice

    card = replace(CARD, patch_size=(32, 32, 16))  # the spine benchmark's patch
    case = spine_slab(26, 51)  # 42 × 76 × 25 voxels: 5.7 patches once padded to the card's multiple of 4
    buffer = AuditBuffer([case], card.patch_size, SeaPeftConfig(budget=1).audit_patches, 0, "cpu", card.divisible_by)
    assert buffer.cost == pytest.approx(44 * 76 * 28 / (32 * 32 * 16))
    net = BrightIsCord()
    with torch.no_grad():
        inter, total = soft_dice(net(torch.from_numpy(case.array)[None]), torch.from_numpy(case.label)[None])
    whole = float(((2 * inter + 1e-5) / (total + 1e-5)).mean())
    assert buffer.dice(net) == pytest.approx(whole, abs=1e-6), "the padding is left out, nothing else"
    patches = AuditBuffer([case], card.patch_size, 2, 0)  # the former buffer: one cord patch, one background
    assert patches.cost == 2 and patches.batches[0][0].shape[2:] == (32, 32, 16)
    assert patches.dice(net) > whole + 0.05, "two patches miss false positives the whole volume has"


def test_the_first_allocation_starts_from_the_shallow_recipe_one_unit_per_layer():
    from PEFTAdaptLib.adapters.shallow import shallow_layers

    net = small_unet()
    total = sum(p.numel() for p in net.parameters())
    shallow = shallow_layers(net, torch.zeros(1, 1, 16, 16, 16))
    hook = build_sea_peft(net, SeaPeftConfig(budget=int(0.4 * total), steps=8))
    freeze_base(net)
    events = []
    hook.on_start(SimpleNamespace(audit=[spine_slab(26, 51)], card=CARD, device="cpu", emit=events.append))
    active = hook.active_units()
    norms = {u.name for u in hook.allocator.pool if u.family == "norm_affine"}
    assert {f"{site}::sea_dense" for site in shallow} | norms <= set(active)
    assert len(active) > len(shallow) + len(norms), "the rest of the budget is filled"
    sites = [hook.allocator.units[n].site for n in active]
    assert len(sites) == len(set(sites)), "one unit per layer"
    assert hook.allocator.budget_used() <= hook.config.budget
    assert set(hook._prior()) == {f"{site}::sea_dense" for site in shallow} | norms
    assert build_sea_peft(small_unet(), SeaPeftConfig(budget=1000, prior="none"))._prior() == []
    with pytest.raises(PEFTAdaptError, match="prior 'shalow' unknown"):
        build_sea_peft(small_unet(), SeaPeftConfig(budget=1000, prior="shalow"))


# -- the hook in the trainer -----------------------------------------------------------------------------------------
def _run(steps: int, stop_at: int | None = None, state=None, events=None, tmp: Path | None = None, should_stop=None):
    support, audit = [spine_slab(0, 25)], [spine_slab(26, 51)]
    net = small_unet()
    torch.manual_seed(3)
    total = sum(p.numel() for p in net.parameters())
    config = SeaPeftConfig(budget=int(0.1 * total), steps=steps, warmup=4, audit_every=2, allocate_every=4, votes=1,
                           guard=1, audit_units=3, lr=5e-3, seed=5)
    hook = build_sea_peft(net, config)
    events = [] if events is None else events
    trainer = supervised_trainer(net, CARD, support, audit, TrainConfig(steps=stop_at or steps, lr=5e-3, audit_every=4,
                                                                        patches_per_step=1, seed=5),
                                 events.append, [hook])
    if state is not None:
        load_adapters(net, tmp)
        trainer.load_state_dict(state)
        trainer.config.steps = steps
    trainer.run(should_stop)
    return trainer, hook, events


def _stable(events):
    """Events without wall-clock fields."""
    return [{k: v for k, v in e.items() if k not in ("seconds", "eta_s")} for e in events]


def test_the_allocation_is_deterministic_resumes_from_a_checkpoint_and_reports_every_decision(tmp_path):
    _, hook, events = _run(12)
    _, _, again = _run(12)
    assert _stable(events) == _stable(again), "same seed, same run"

    kinds = [e["event"] for e in events]
    assert kinds.count("allocation") == 3  # start, steps 4 and 8 (not at the last step)
    audits = [e for e in events if e["event"] == "unit_audit"]
    assert {"first_order", "toggle"} == {e["estimate"] for e in audits}
    for e in audits + [e for e in events if e["event"] == "unit_state"]:
        for field in ("unit", "site", "family", "rank", "cost", "utility", "state", "budget_used", "budget"):
            assert e[field] is not None, field
        assert e["budget_used"] <= e["budget"]
    assert all("delta_dice" in e for e in audits)
    assert all(e["budget_used"] <= e["budget"] for e in events if e["event"] == "allocation")
    final = next(e for e in events if e["event"] == "final_selection")
    assert final["units"] == hook.active_units() and final["budget_used"] <= final["budget"]
    assert set(final["units"]) <= hook.allocator.trained, "the final configuration holds trained units only"
    assert set(final["previous_units"]) == set(next(e for e in reversed(events) if e["event"] == "allocation")["units"])
    assert len(final["candidates"]) >= 2

    # interrupt after step 6 (between allocations), checkpoint like the worker does, resume in a fresh network
    head = []
    trainer, _, _ = _run(12, stop_at=6, events=head)
    save_adapters(trainer.network, tmp_path / "adapter")
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # the worker's loader: plain data only
    tail = []
    resumed, resumed_hook, _ = _run(12, state=state, events=tail, tmp=tmp_path / "adapter")
    assert resumed.step == 12
    assert resumed_hook.active_units() == hook.active_units()
    assert resumed_hook.allocator.state_dict() == hook.allocator.state_dict()
    uninterrupted = [e for e in _stable(events) if e.get("step", 0) > 6]
    assert [e for e in _stable(tail) if e.get("step", 0) > 6] == uninterrupted


def test_a_cancel_inside_the_final_sweep_stops_between_its_audits_and_a_resume_ends_as_the_uninterrupted_run(
        tmp_path):
    """Found by a user-level check: a cancel while SEA-PEFT's final sweep audited its unit sets (3.5 minutes on a
    whole-brain MeshNet audit) waited for the whole sweep and the last step's audit."""
    _, hook, events = _run(12)
    judged = [e["detail"] for e in events if e.get("detail", "").startswith("auditing unit set")]
    assert len(judged) >= 2

    head = []  # a cancel once the first unit set is being audited
    trainer, _, _ = _run(12, events=head, should_stop=lambda: "auditing unit set 1" in head[-1].get("detail", ""))
    assert trainer.step == 12 and [e.get("detail") for e in head if e["event"] == "phase"][-1] == judged[0]
    assert not [e for e in head if e["event"] in ("final_selection", "audit") and e["step"] == 12]
    assert trainer.history[-1][0] < 12  # the last step's audit is not done either
    save_adapters(trainer.network, tmp_path / "adapter")  # checkpointed like the worker does
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    tail = []
    resumed, resumed_hook, _ = _run(12, state=torch.load(tmp_path / "state.pt", weights_only=True), events=tail,
                                    tmp=tmp_path / "adapter")
    assert resumed_hook.active_units() == hook.active_units()
    assert resumed_hook.allocator.state_dict() == hook.allocator.state_dict()
    last_step = [e for e in _stable(events) if e.get("step") == 12 and e["event"] != "step"]
    assert [e for e in _stable(tail) if e.get("step") == 12] == last_step  # the sweep and the audit, done again


# -- a real run through the worker -----------------------------------------------------------------------------------
def test_real_allocation_run_through_the_worker_keeps_the_budget(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker import events, spec

    from PEFTAdaptLib.jobs import create_job
    from PEFTAdaptLib.methods import Budget, make_method
    from PEFTAdaptLib.worker import EXIT_FINISHED, run_job

    job = spec(steps=16, checkpoint_every=16)
    job.method = make_method("sea-peft", budget=Budget(fraction=0.01))
    job.train.audit_every = 16
    create_job(tmp_path, job)
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    seen = events(tmp_path)
    budget = next(e for e in seen if e["event"] == "started")["budget"]
    assert budget == int(0.01 * 2_126_258)
    allocations = [e for e in seen if e["event"] == "allocation"]
    assert allocations[0]["step"] == 0 and all(0 < a["budget_used"] <= budget for a in allocations)
    final = next(e for e in seen if e["event"] == "final_selection")  # the schedule is scaled to the job's steps
    assert final["step"] == 16 and 0 < final["budget_used"] <= budget
    audits = [e for e in seen if e["event"] == "unit_audit"]
    assert {"first_order", "toggle"} <= {a["estimate"] for a in audits}
    families = {a["family"] for a in audits}
    assert {"lora", "salt", "norm_affine", "bitfit"} <= families  # deepbet: convs and instance norms
    dice = [e["dice"] for e in seen if e["event"] == "audit"]
    finished = next(e for e in seen if e["event"] == "finished")
    assert finished["best_dice"] >= dice[0]


# -- what a front-end says the job kept ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planar(tmp_path_factory) -> dict:
    """The 2D tests' small model (planar_model.py) with T1c slices of two BraTS patients: a SEA-PEFT job in seconds."""
    from planar_model import as_single_slice, brats_slice, train_bundle

    from PEFTAdaptLib.jobs import CaseSpec

    folder = tmp_path_factory.mktemp("planar")
    cases = {}
    for patient in (3, 4):
        image, label = brats_slice(patient, "T1c")
        cases[patient] = CaseSpec([str(as_single_slice(image, folder / f"p{patient}.nii.gz"))],
                                  str(as_single_slice(label, folder / f"p{patient}_label.nii.gz")))
    return {"model": train_bundle(folder / "brats-2d"), "support": [cases[3]], "audit": [cases[4]]}


def _planar_job(planar: dict, folder: Path, steps: int, lr: float):
    from PEFTAdaptLib.jobs import JobClient, JobSpec, TrainSpec
    from PEFTAdaptLib.methods import Budget, make_method

    job = JobClient(folder).submit(JobSpec(
        model=str(planar["model"]), support=planar["support"], audit=planar["audit"],
        method=make_method("sea-peft", budget=Budget(fraction=0.1)),
        train=TrainSpec(steps=steps, lr=lr, patches_per_step=2, audit_every=4, seed=2, device="cpu")))
    assert job.wait(timeout=300).outcome == "finished", job.state.message
    return job


def test_the_allocation_summary_names_the_kept_state_not_the_last_allocation(planar, tmp_path):
    """Found by a user: the CLI's allocation line (RunState, also the Slicer panel's and the browser's) was the last
    allocation or final sweep, while the job kept, and saved, an earlier audited state with other units."""
    job = _planar_job(planar, tmp_path, steps=45, lr=0.05)  # re-allocated at 44, final sweep at 45
    saved = json.loads((job.adapter_folder / "adapter.json").read_text())
    active = sorted(f"{unit['layer']}::{unit['name']}" for unit in saved["units"] if unit["active"])
    last = [e for e in job.events if e["event"] in ("allocation", "final_selection")][-1]
    state = job.state
    assert state.kept == "adapted" and sorted(last["units"]) != active, "the case: the kept state is an earlier one"
    assert state.units == active
    cost = {e["unit"]: e["cost"] for e in job.events if e["event"] in ("unit_audit", "unit_state")}
    parameters = sum(cost[name] for name in active)  # a unit's cost is its trainable parameters
    assert state.trainable == parameters
    assert state.allocation_summary.startswith(f"{len(active)} active adapter units, {parameters:,} of ")

    # what a front-end says while the first allocation and the choosing take minutes (found on a whole-brain audit:
    # 7 minutes of "choosing the state to keep" with nothing more, and 2 before the first step with nothing at all)
    phases = [(e["phase"], e.get("detail", "")) for e in job.events if e["event"] == "phase"]
    fresh = sum(1 for e in job.events if e["event"] == "unit_audit" and e["step"] == 0)
    assert phases[0] == ("allocating", f"estimating the gain of {fresh} candidate units")
    assert [e["event"] for e in job.events].index("started") > [e.get("phase") for e in job.events].index("allocating")
    assert phases[1] == ("auditing", "")
    judged = [detail for phase, detail in phases if detail.startswith("auditing unit set")]
    assert judged and judged == [f"auditing unit set {i} of {len(judged)}" for i in range(1, len(judged) + 1)]
    assert phases[-2:] == [("choosing", "auditing the last step's state"),
                           ("choosing", "measuring how much the kept state changes the audit volumes")]
    # the kept state is not scored again: its audit is the one it was kept for
    best_step = next(e for e in job.events if e["event"] == "finished")["best_step"]
    kept_audit = next(e for e in job.events if e["event"] == "audit" and e["step"] == best_step)
    validation = next(e for e in job.events if e["event"] == "validation")
    assert (validation["dice"], validation["cases"], validation["classes"]) == (
        kept_audit["dice"], kept_audit["cases"], kept_audit["classes"])
    seen = RunState()
    first_judged = next(i for i, e in enumerate(job.events) if e.get("detail", "").startswith("auditing unit"))
    for event in job.events[:first_judged + 1]:
        seen.update(event)
    assert seen.describe().startswith(f"Choosing the state to keep: auditing unit set 1 of {len(judged)}, step 45/45")


def test_when_the_source_model_is_kept_no_allocation_is_shown_as_delivered(planar, tmp_path):
    job = _planar_job(planar, tmp_path, steps=2, lr=1e-6)  # too small a step for any reliable gain
    state = job.state
    assert state.kept == "start" and state.active_units is not None  # units were allocated, and none kept
    assert state.allocation_summary == "" and state.trainable_text.endswith(", trained but not kept")
    # the kept start is the source itself: its audit score and its (nil) change on the audit are known, not redone
    details = [e.get("detail", "") for e in job.events if e["event"] == "phase"]
    assert not any(d.startswith(("measuring", "scoring")) for d in details)
    first = next(e for e in job.events if e["event"] == "audit")
    validation = next(e for e in job.events if e["event"] == "validation")
    assert (validation["dice"], validation["cases"], validation["classes"]) == (first["dice"], first["cases"],
                                                                                 first["classes"])
    metadata = json.loads((job.adapter_folder / "adapter.json").read_text())["metadata"]
    assert metadata["audit_change"] == {} and metadata["source_kept"] is True


# -- the final sweep's choice ----------------------------------------------------------------------------------------
def _cylinder_score(radius_by_slice):
    """An audit score of one 32³ case whose reference is a radius-8 cylinder along z, predicted with the given radius
    in each slice."""
    from PEFTAdaptLib.selection import AuditCounts
    from PEFTAdaptLib.training import Score

    x, y = np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5, indexing="ij")
    reference = np.repeat(((x ** 2 + y ** 2) <= 64)[..., None], 32, axis=2).astype(np.int64)
    prediction = np.stack([(x ** 2 + y ** 2) <= r * r for r in radius_by_slice], axis=-1).astype(np.int64)
    counts = AuditCounts([AuditCounts.measure(prediction, reference, classes=2)])
    return Score(counts.dice(), {}, counts)


def test_the_final_sweep_keeps_the_trained_set_unless_another_is_better_beyond_the_audits_noise():
    from PEFTAdaptLib.seapeft.hook import final_choice
    from PEFTAdaptLib.selection import SelectionRule

    rule = SelectionRule()
    compare = lambda a, b: rule.judge(a.counts, b.counts)  # noqa: E731 — what the trainer's scorer does
    current = {"label": "current", "score": _cylinder_score([6] * 32), "reliable": True}
    one_slab_better = {"label": "re-solve", "score": _cylinder_score([6] * 30 + [7] * 2), "reliable": True}
    everywhere_better = {"label": "pruned", "score": _cylinder_score([7] * 32), "reliable": True}
    assert one_slab_better["score"].value > current["score"].value  # the old rule (highest audit Dice) switched

    assert final_choice([one_slab_better, current], compare) is current
    assert final_choice([one_slab_better, everywhere_better, current], compare) is everywhere_better
    assert final_choice([one_slab_better, dict(current, reliable=False)], compare) is one_slab_better
    assert final_choice([one_slab_better, current], None) is one_slab_better  # a scorer without a rule
    assert final_choice([dict(current, reliable=False)], compare) is None
