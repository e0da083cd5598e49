"""Label-free adaptation (ConvLoRA + AdaBN self-training against an early segmentation head): where the head
attaches, that pseudo-labels carry no gradient, that agreement-based selection restores the state it reports, and
a real worker job on an unlabelled volume."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import BasicUNet, UNet

from conftest import shared
from PEFTAdaptLib.adapters import ConvLoRAUnit, NormAffineUnit, iter_units
from PEFTAdaptLib.data.cases import prepare_case
from PEFTAdaptLib.jobs import CaseSpec, JobSpec, TrainSpec, create_job
from PEFTAdaptLib.jobs.client import CANCEL_FILE
from PEFTAdaptLib.jobs.events import read_events
from PEFTAdaptLib.labelfree import (
    ESH_SOURCE_CONFIDENT, FeatureTap, LabelFreeConfig, build_head, build_label_free, choose_stage,
    find_encoder_stages, self_training_loss,
)
from PEFTAdaptLib.methods import BuildContext, Cases, make_method
from PEFTAdaptLib.methods.base import SOURCE_START
from PEFTAdaptLib.methods.label_free import ADABN_START
from PEFTAdaptLib.models.card import LabelInfo, ModelCard
from PEFTAdaptLib.training import TrainConfig, Trainer, TrainingContext
from PEFTAdaptLib.worker import EXIT_CANCELLED, EXIT_FINISHED, run_job

SPINE_CARD = ModelCard(
    id="test-spine", title="spinal cord", description="", modality="MR", input_channels=1, spacing=(1.0, 1.0, 1.0),
    orientation="RAS", normalization={"name": "percentile_zscore", "p_low": 0.5, "p_high": 99.5},
    patch_size=(32, 32, 16), inference_roi=(64, 64, 32), labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")],
    license="MIT", source="test", divisible_by=8,
)


def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=1)


def central(image: sitk.Image) -> sitk.Image:
    nx, ny, _ = image.GetSize()
    return image[(nx - 64) // 2:(nx + 64) // 2, (ny - 64) // 2:(ny + 64) // 2, :]


@pytest.fixture(scope="module")
def spine_t2():
    """Subject A's real T2 spinal-cord volume (central 64 mm) on a 1 mm grid; no label."""
    image = sitk.ReadImage(str(shared("spine/t2/t2.nii.gz")), sitk.sitkFloat32)
    return prepare_case("A_t2", [central(image)], SPINE_CARD)


@pytest.fixture(scope="module")
def spine_t1_reference():
    """Subject A's T1 with its manual cord label: a reference for evaluation-only Dice."""
    image = sitk.ReadImage(str(shared("spine/t1/t1w.nii.gz")), sitk.sitkFloat32)
    label = sitk.Cast(sitk.ReadImage(str(shared("spine/t1/t1w_seg-manual.nii.gz"))) > 0.5, sitk.sitkUInt8)
    label.CopyInformation(image)
    return prepare_case("A_t1", [central(image)], SPINE_CARD, central(label))


def test_esh_attaches_to_the_second_encoder_stage_of_a_monai_unet():
    network = small_unet()
    assert find_encoder_stages(network) == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
                                            "model.1.submodule.1.submodule.1.submodule"]
    stage = choose_stage(network)
    assert stage == "model.1.submodule.0"
    tap = FeatureTap(network, stage)
    x = torch.randn(1, 1, 32, 32, 16)
    head = build_head(network, tap, x, num_classes=2)
    assert tap.features.shape == (1, 16, 8, 8, 4)  # the second stage: 16 channels at 1/4 resolution
    assert head(tap.features, x.shape[2:]).shape == (1, 2, 32, 32, 16)
    assert choose_stage(network, "model.0") == "model.0"  # override by module name


def test_basic_unet_stages_are_found():
    network = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
    assert find_encoder_stages(network) == ["conv_0", "down_1", "down_2", "down_3", "down_4"]
    assert choose_stage(network) == "down_1"


def test_esh_attaches_to_deepbet_and_adapters_stay_upstream_of_it(deepbet):
    network = deepbet.network
    assert choose_stage(network) == "down0"
    tap = FeatureTap(network, "down0")
    x = torch.randn(1, 1, 64, 64, 64)
    build_head(network, tap, x, num_classes=2)
    assert tap.features.shape == (1, 16, 16, 16, 16)
    from PEFTAdaptLib.labelfree import attach_adapters

    records = attach_adapters(network, ["init", "down0"], LabelFreeConfig())
    kinds = {type(r.unit) for r in records}
    assert kinds == {ConvLoRAUnit, NormAffineUnit}  # instance norm: norm-affine, no AdaBN
    assert all(r.layer.split(".")[0] in ("init", "down0") for r in records)


def test_a_label_free_start_with_adabn_statistics_is_not_called_the_source_model(spine_t2):
    """AdaBN re-estimates batch-norm statistics on the target before the step-0 score: a run that keeps its start
    keeps that, not the source model (its messages said "the source model is kept"; its adapter would have been
    taken for the source model itself)."""
    torch.manual_seed(0)
    for network, start in ((small_unet(), SOURCE_START),
                           (BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"), ADABN_START)):
        plan = make_method("label-free").build(BuildContext(network, SPINE_CARD, 0, 1e-3, 2, 1, 0, "cpu",
                                                            Cases([spine_t2], [])))
        assert (plan.start, plan.info["adabn"]) == (start, start == ADABN_START)


def unit_state(network) -> dict:
    return {f"{r.layer}::{r.name}": {k: v.detach().clone() for k, v in r.unit.state_dict().items()}
            for r in iter_units(network)}


def test_pseudo_labels_carry_no_gradient(spine_t2):
    network = small_unet()
    parts = build_label_free(network, SPINE_CARD, [spine_t2], LabelFreeConfig(esh_steps=0, held_patches=1))
    decoder = network.get_submodule("model.2.0.conv").weight  # the last up-sampling conv: decoder only
    decoder.requires_grad_(True)
    for record in iter_units(network):
        for parameter in record.unit.parameters():
            parameter.requires_grad_(True)
    image = parts.objective.sampler()
    loss, pseudo = self_training_loss(network, parts.start.head, parts.start.tap, image)
    assert not pseudo.requires_grad and pseudo.grad_fn is None
    loss.backward()
    assert decoder.grad is None  # no path from the loss through the pseudo-labels into the decoder
    lora_grads = [p.grad for r in iter_units(network) if isinstance(r.unit, ConvLoRAUnit) for p in r.unit.parameters()]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(float(g.abs().sum()) > 0 for g in lora_grads)
    assert all(p.grad is None for p in parts.start.head.parameters())  # the ESH is frozen


def test_agreement_selection_restores_the_state_of_the_reported_step(spine_t2, spine_t1_reference):
    """Label-free runs in the one `Trainer`: agreement is its score, and the best-state mechanism is the same."""
    network = small_unet()
    snapshots: dict[int, dict] = {}
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "agreement":
            snapshots[event["step"]] = unit_state(network)

    parts = build_label_free(network, SPINE_CARD, [spine_t2], LabelFreeConfig(esh_steps=8, held_patches=2, seed=3),
                             reference=[spine_t1_reference])
    context = TrainingContext(network, SPINE_CARD, [], "cpu", on_event)
    trainer = Trainer(parts.objective, parts.scorer, context,
                      TrainConfig(steps=12, lr=2e-2, patches_per_step=2, audit_every=3, seed=3), [parts.start])
    assert trainer.run()
    assert next(e for e in events if e["event"] == "esh")["source"] == ESH_SOURCE_CONFIDENT
    final_state = unit_state(network)
    trainer.restore_best()
    summary = trainer.summary()
    steps = [s for s, _ in summary["history"]]
    assert steps == [0, 3, 6, 9, 12] and sorted(snapshots) == steps
    scores = [a for _, a in summary["history"]]
    assert summary["best_step"] == steps[scores.index(max(scores))]
    assert summary["best_score"] == max(scores)
    restored = unit_state(network)
    expected = snapshots[summary["best_step"]]
    assert restored.keys() == expected.keys()
    for key in expected:
        for name, tensor in expected[key].items():
            assert torch.equal(restored[key][name], tensor), (key, name)
    # the reference Dice is reported with every agreement, and plays no part in the selection above
    assert all(0.0 <= e["dice"] <= 1.0 for e in events if e["event"] == "agreement")
    if summary["best_step"] != 12:  # a real rewind, not the last state
        assert any(not torch.equal(final_state[k][n], t) for k in expected for n, t in expected[k].items())


def unlabelled_brain_job(folder, steps: int = 4) -> None:
    """A label-free job of the real default model on a real brain volume given without any label (no audit either)."""
    image = str(shared("brats/brats_2013_pat0003_1/T1c_subtrMeanDivStd.nii.gz"))
    spec = JobSpec(
        model="deepbet-brain", support=[CaseSpec([image])], audit=[], method=make_method("label-free", rank=2),
        train=TrainSpec(steps=steps, lr=1e-3, patch_size=[64, 64, 64], patches_per_step=1, audit_every=2, seed=0,
                        device="cpu"),
    )
    create_job(folder, spec)


def test_worker_label_free_job_on_an_unlabelled_volume(tmp_path):
    """The real default model on a real brain volume given without any label (no audit either)."""
    unlabelled_brain_job(tmp_path)
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    events = read_events(tmp_path)[0]
    kinds = [e["event"] for e in events]
    assert "audit" not in kinds and kinds[-1] == "finished"
    started = next(e for e in events if e["event"] == "started")
    assert started["method"] == "label-free" and started["esh_stage"] == "down0" and started["trainable"] > 0
    esh = next(e for e in events if e["event"] == "esh")
    assert esh["source"] == ESH_SOURCE_CONFIDENT
    agreement = [e for e in events if e["event"] == "agreement"]
    assert [e["step"] for e in agreement] == [0, 2, 4]
    assert all(0.0 <= e["agreement"] <= 1.0 and "dice" not in e for e in agreement)  # no reference, no Dice
    metadata = json.loads((tmp_path / "adapter" / "adapter.json").read_text())["metadata"]
    assert metadata["esh_source"] == ESH_SOURCE_CONFIDENT and metadata["esh_stage"] == "down0"
    finished = events[-1]
    assert finished["best_agreement"] == max(e["agreement"] for e in agreement)
    assert metadata["final"] is True
    # instance norm (no AdaBN): the start is the source model, so a kept start is the source itself
    assert metadata["adabn"] is False and metadata["source_kept"] == (finished["kept"] == "start")
    # one loop, one checkpoint format: a label-free job resumes like any other
    assert any(e["event"] == "checkpoint" for e in events) and (tmp_path / "checkpoint").is_dir()
    # selection was by agreement, and there was no audit: the result says so
    for said in (finished, next(e for e in events if e["event"] == "validation")):
        assert "audit" not in said["message"]
        assert said["message"] in (f"adapted state of step {finished['best_step']} kept",
                                   "ESH/decoder agreement never rose above step 0's: the source model is kept")


def test_a_model_whose_encoder_stages_are_unknown_is_refused_saying_which_the_method_reads(tmp_path):
    """On MeshNet (a stack of dilated convolutions), the job failed telling the user to "name the encoder stage to
    attach to", which no front-end lets them do."""
    from test_cli import assert_one_line_error, run

    result = run("adapt", "--model", str(shared("meshnet/model5_gw_ae")), "--method", "label-free", "--target",
                 str(shared("meshnet/t1_crop.nii.gz")), "--steps", "2", "--output", str(tmp_path / "job"))
    assert_one_line_error(result, "method 'label-free' cannot adapt model 'model5_gw_ae'",
                          "it reads those of deepbet's LinkNet3d, nnU-Net's U-Nets, MONAI's UNet and BasicUNet",
                          "choose a method that trains on annotated volumes")
    assert "name the encoder stage" not in result.stderr


def test_a_cancelled_label_free_job_names_agreement_not_an_audit_and_resumes_exactly(tmp_path):
    """Cancelled after its step-2 agreement (a real job, as a user's cancel file stops it): the message says which
    state the adapter holds by the score that chose it, the ESH/decoder agreement; no audit exists. `--resume`
    continues from the checkpoint, without a word, to the agreements of an uninterrupted run (docs/labelfree.md)."""
    unlabelled_brain_job(tmp_path / "whole", steps=8)
    assert run_job(tmp_path / "whole", echo=False) == EXIT_FINISHED
    tmp_path = tmp_path / "cancelled"
    unlabelled_brain_job(tmp_path, steps=8)

    def cancel_after_step_2(event: dict) -> None:
        if event["event"] == "agreement" and event["step"] == 2:
            (tmp_path / CANCEL_FILE).touch()
    assert run_job(tmp_path, emit_extra=cancel_after_step_2, echo=False) == EXIT_CANCELLED
    events = read_events(tmp_path)[0]
    agreement = {e["step"]: e["agreement"] for e in events if e["event"] == "agreement"}
    cancelled = events[-1]
    assert cancelled["event"] == "cancelled" and "audit" not in cancelled["message"]
    step = cancelled["best_step"]
    assert cancelled["message"].endswith(
        f"the adapter is the state of step {step} (agreement {agreement.get(step, 0):.4f}), the highest ESH/decoder "
        "agreement so far" if cancelled["kept"] == "adapted" else
        "no state's ESH/decoder agreement rose above step 0's so far: the adapter is the source model")
    assert run_job(tmp_path, resume=True, echo=False) == EXIT_FINISHED
    resumed, whole = read_events(tmp_path)[0], read_events(tmp_path.parent / "whole")[0]
    assert [e["resumed_from_step"] for e in resumed if e["event"] == "started"] == [0, cancelled["step"]]
    assert not [e for e in resumed if e["event"] == "warning"]
    scores = lambda events: {e["step"]: e["agreement"] for e in events if e["event"] == "agreement"}  # noqa: E731
    assert scores(resumed) == scores(whole) and resumed[-1]["message"] == whole[-1]["message"]


def test_label_free_adapts_an_nnunet_model_its_early_head_reading_the_encoder_in_the_volumes_axis_order(tmp_path):
    """nnU-Net networks run in their own axis order (z, y, x) inside a fixed permutation: label-free adaptation found
    no encoder stage in them, and its ConvLoRA refused their in-plane 1×3×3 kernels. The head now reads nnU-Net's
    encoder stages with their features put back in the volume's axis order."""
    from test_cli import run
    from test_model_loaders import _ct_crop, _write_nnunet

    from PEFTAdaptLib.models.registry import load_model

    folder, _ = _write_nnunet(tmp_path / "model")
    network = load_model(folder).network
    assert find_encoder_stages(network) == [f"network.encoder.stages.{i}" for i in range(3)]
    tap = FeatureTap(network, choose_stage(network))
    x = torch.randn(1, 1, 48, 32, 16)  # (x, y, z); the second stage halves x and y only (nnU-Net's strides)
    head = build_head(network, tap, x, num_classes=2)
    assert tap.features.shape[2:] == (24, 16, 16) and head(tap.features, x.shape[2:]).shape == (1, 2, 48, 32, 16)

    sitk.WriteImage(_ct_crop(), str(tmp_path / "ct.nii.gz"))
    result = run("adapt", "--model", str(folder), "--method", "label-free", "--target", str(tmp_path / "ct.nii.gz"),
                 "--steps", "2", "--output", str(tmp_path / "job"))
    assert result.returncode == 0, result.stderr
    started = next(e for e in read_events(tmp_path / "job")[0] if e["event"] == "started")
    assert started["esh_stage"] == "network.encoder.stages.1"
    units = json.loads((tmp_path / "job" / "adapter" / "adapter.json").read_text())["units"]
    in_plane = network.get_submodule("network.encoder.stages.0.0.convs.0.conv")
    assert tuple(in_plane.weight.shape[2:]) == (1, 3, 3)
    assert any(unit["layer"] == "network.encoder.stages.0.0.convs.0.conv" and unit["kind"] == "convlora"
               for unit in units)
