"""The method registry: one meaning of "budget", every method × (budget / rank / both / neither), costs computed
without copying the network, and a method added from one file outside the engine running end to end."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import UNet

from conftest import shared
from PEFTAdaptLib.adapters import count_trainable
from PEFTAdaptLib.data.cases import prepare_case
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.methods import Budget, BuildContext, Cases, MethodError, make_method, method_class, method_names
from PEFTAdaptLib.models.card import LabelInfo, ModelCard

TESTING = Path(__file__).resolve().parent
CARD = ModelCard(
    id="test-spine", title="spinal cord", description="", modality="MR", input_channels=1, spacing=(1.0, 1.0, 1.0),
    orientation="RAS", normalization={"name": "percentile_zscore"}, patch_size=(32, 32, 16),
    inference_roi=(64, 64, 32), labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")], license="MIT",
    source="test", divisible_by=8,
)


@pytest.fixture(scope="module")
def spine():
    image = sitk.ReadImage(str(shared("spine/t2/t2.nii.gz")), sitk.sitkFloat32)
    label = sitk.Cast(sitk.ReadImage(str(shared("spine/t2/t2_seg-manual.nii.gz"))) > 0.5, sitk.sitkUInt8)
    label.CopyInformation(image)
    return prepare_case("t2", [image], CARD, label)


def network() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=1)


def build(method, case):
    net = network()
    total = sum(p.numel() for p in net.parameters())
    plan = method.build(BuildContext(net, CARD, total, 1e-3, 8, 1, 0, "cpu", Cases([case], [case])))
    return net, total, plan


# -- budget ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, fraction, count", [("1%", 0.01, None), ("0.5 %", 0.005, None), ("0.01", 0.01, None),
                                                   ("21262", None, 21262), ("1", None, 1),
                                                   ("1.0", 1.0, None)])  # read as one parameter, it failed late
def test_a_budget_is_a_fraction_or_a_count_and_says_which(text, fraction, count):
    budget = Budget.parse(text)
    assert (budget.fraction, budget.count) == (fraction, count)
    assert Budget.from_dict(budget.to_dict()) == budget
    assert ("%" in budget.describe()) if fraction else ("parameters" in budget.describe())


@pytest.mark.parametrize("text, fragment", [("1.5", "for a percentage write 1.5%"), ("nan", "not a finite"),
                                            ("2.0", "for a percentage write 2.0%"),
                                            ("0", "fraction 0.0 must be"), ("-2%", "must be a number in (0, 1]"),
                                            ("lots", "not a number")])
def test_a_bad_budget_is_refused_naming_it(text, fragment):
    with pytest.raises(InputError, match="budget") as error:
        Budget.parse(text)
    assert fragment in str(error.value)


def test_a_count_beyond_the_model_is_refused():
    with pytest.raises(InputError, match="more than the model's 1,000"):
        Budget(count=5000).parameters(1000)


# -- every method × (budget, rank, both, neither) --------------------------------------------------------------------
RANKED = ("lora", "convlora", "salt")


def combinations():
    for name in method_names():
        if name.startswith("toy") or name == "lora-qv":  # transformers only: Testing/test_vit.py
            continue
        for given in ("neither", "budget", "rank", "both"):
            yield name, given


@pytest.mark.parametrize("name, given", list(combinations()))
def test_every_method_takes_a_budget_and_a_rank_as_documented_or_refuses_naming_the_field(name, given, spine):
    cls = method_class(name)
    fields = {}
    if given in ("budget", "both"):
        fields["budget"] = Budget(fraction=0.1)
    if given in ("rank", "both"):
        fields["rank"] = 2
    refused = ("budget" in fields and not cls.takes_budget) or ("rank" in fields and not cls.ranks)
    if refused:
        field = "rank" if "rank" in fields and not cls.ranks else "budget"  # checked in this order
        with pytest.raises(MethodError, match=f"field '{field}'"):
            make_method(name, **fields)
        return
    method = make_method(name, **fields)
    default_limit = int(0.01 * sum(p.numel() for p in network().parameters()))
    if name in RANKED and given == "neither" and method.cost(network(), 1) > default_limit:
        with pytest.raises(MethodError, match="more than the model's default budget .*field 'budget'"):
            build(method, spine)  # even rank 1 is over the default budget (1 %) on this small network
        return
    net, total, plan = build(method, spine)
    trainable = count_trainable(net, active_only=False)
    if name in RANKED:
        if "rank" in fields:
            assert plan.rank == 2 and "given" in plan.info["rank_reason"]
        else:  # the largest rank that fits the budget (given, or the model's default)
            limit = int(0.1 * total) if "budget" in fields else default_limit
            assert method.cost(net, plan.rank) <= limit and "fits" in plan.info["rank_reason"]
            larger = [r for r in cls.ranks if r > plan.rank]
            assert not larger or make_method(name).cost(network(), larger[0]) > limit
        assert trainable == method.cost(network(), plan.rank)
    elif name == "sea-peft":
        assert plan.budget == int((0.1 if "budget" in fields else 0.01) * total)
        assert plan.hooks and plan.hooks[0].config.budget == plan.budget
    elif name == "label-free":
        assert plan.rank == (2 if "rank" in fields else cls.default_rank)
        assert plan.objective is not None and plan.scorer.key == "agreement"
    else:
        assert plan.rank is None and trainable > 0


def test_a_rank_over_an_explicit_budget_is_refused_with_both_fields_named(spine):
    with pytest.raises(MethodError, match="rank 32 trains .*fields 'rank' and 'budget'"):
        build(make_method("lora", rank=32, budget=Budget(count=100)), spine)


def test_no_rank_fits_a_tiny_budget_and_the_message_says_what_to_do(spine):
    with pytest.raises(MethodError, match="even rank 1 .* raise the budget, or choose sea-peft"):
        build(make_method("lora", budget=Budget(count=10)), spine)


def test_unknown_methods_and_settings_are_refused_by_name():
    with pytest.raises(MethodError, match="unknown method 'lora2'"):
        make_method("lora2")
    with pytest.raises(MethodError, match="has no setting 'alpha'"):
        make_method("lora", alpha=3)
    with pytest.raises(MethodError, match="rank 3 is not one of"):
        make_method("salt", rank=3)


@pytest.mark.parametrize("name", RANKED)
def test_costs_from_layer_shapes_equal_the_units_built_on_the_real_default_model(name, deepbet):
    for rank in (1, 4):
        net = copy.deepcopy(deepbet.network)
        expected = make_method(name).cost(net, rank)
        make_method(name, rank=rank).build(BuildContext(net, deepbet.card, 1, 1e-3, 1, 1, 0, "cpu", Cases([], [])))
        assert count_trainable(net) == expected


# -- a method from one file outside the engine ----------------------------------------------------------------------
@pytest.fixture
def toy_plugin(tmp_path) -> Path:
    """An installed distribution that only declares the entry point; the method's code is Testing/toy_method.py."""
    dist = tmp_path / "toy_method-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[peftadapt.methods]\ntoy-last-bias = toy_method\n")
    return tmp_path


def _plugin_env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTING), os.environ.get("PYTHONPATH", "")])}


def test_a_method_registered_from_a_test_file_runs_through_the_cli_and_the_job_client(toy_plugin, tmp_path):
    brats = shared("brats/brats_2013_pat0003_1")
    image, mask = str(brats / "T1c_subtrMeanDivStd.nii.gz"), str(brats / "brainmask.nii.gz")
    other = shared("brats/brats_2013_pat0004_1")
    audit = [str(other / "T1c_subtrMeanDivStd.nii.gz"), str(other / "brainmask.nii.gz")]
    peftadapt = Path(sys.executable).with_name("peftadapt")
    cli = subprocess.run([str(peftadapt), "adapt", "--method", "toy-last-bias", "--train", image, mask, "--audit",
                          *audit, "--steps", "2", "--patch-size", "64", "--patches-per-step", "1",
                          "--audit-every", "2", "--device", "cpu", "--output", str(tmp_path / "cli")],
                         capture_output=True, text=True, env=_plugin_env(toy_plugin), timeout=900)
    assert cli.returncode == 0, cli.stderr
    assert "method: toy-last-bias" in cli.stdout

    from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, SubprocessRunner, TrainSpec

    sys.path.insert(0, str(TESTING))
    import toy_method  # noqa: F401 - registers the method in this process too (the request is validated here)

    client = JobClient(tmp_path / "work", SubprocessRunner(python_path=[str(toy_plugin), str(TESTING)]))
    job = client.submit(JobSpec(model="deepbet-brain", support=[CaseSpec([image], mask)],
                                audit=[CaseSpec(audit[:1], audit[1])], method=make_method("toy-last-bias"),
                                train=TrainSpec(steps=2, patch_size=[64] * 3, patches_per_step=1, audit_every=2,
                                                device="cpu")))
    state = job.wait(timeout=900)
    assert state.outcome == "finished", state.message
    started = next(e for e in job.events if e["event"] == "started")
    assert started["method"] == "toy-last-bias" and started["toy_layer"] and 0 < state.trainable < 100
