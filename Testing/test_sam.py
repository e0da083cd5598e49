"""segment-anything model folders: the ported image encoder against segment-anything's own code, a checkpoint in
Meta's layout loaded as data (a code-carrying pickle refused), and a SAM model adapted with LoRA on the fused qkv's
query and value rows plus its new head, by the real worker on real 2D slices. The SAM weights are random (a small
encoder of SAM's architecture): Meta's checkpoints cannot be downloaded here, and the tests check the arithmetic
and the product path, not SAM's accuracy."""
from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from planar_model import as_png, brats_slice
from test_cli import assert_one_line_error, run
from PEFTAdaptLib.adapters.io import read_adapter_config
from PEFTAdaptLib.data.io import same_geometry
from PEFTAdaptLib.errors import InputError, ModelError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec
from PEFTAdaptLib.jobs.events import read_events
from PEFTAdaptLib.methods import make_method
from PEFTAdaptLib.models.registry import list_models, load_model, model_card
from PEFTAdaptLib.models.sam_network import ImageEncoderViT, encoder_settings
from PEFTAdaptLib.seapeft.pool import build_pool

#: a small encoder of SAM's design: windowed blocks with one global block, relative positions, 3 heads
TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 4.0,
        "out_chans": 32, "window_size": 4, "global_attn_indexes": (1,)}


@pytest.fixture
def reference(monkeypatch):
    return import_reference(monkeypatch)


def import_reference(monkeypatch):
    """segment-anything's `modeling.image_encoder` module, imported without the package's `__init__` (which
    imports torchvision for its predictor)."""
    spec = importlib.util.find_spec("segment_anything")
    assert spec is not None, "segment-anything is a test dependency (pip install -e '.[test]')"
    root = Path(spec.origin).parent
    for name, path in (("segment_anything", root), ("segment_anything.modeling", root / "modeling")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, package)
    for name in ("common", "image_encoder"):
        monkeypatch.delitem(sys.modules, f"segment_anything.modeling.{name}", raising=False)
    return importlib.import_module("segment_anything.modeling.image_encoder")


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (SAM zero-initialises its position tables; zeros would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


def reference_encoder(reference, **overrides):
    settings = {**TINY, **overrides}
    return randomised(reference.ImageEncoderViT(**{**settings, "use_rel_pos": True})).eval()


def test_the_ported_encoder_equals_segment_anythings_own(reference):
    original = reference_encoder(reference)
    state = original.state_dict()
    settings = encoder_settings(state)
    assert settings["num_heads"] == 3 and settings["window_size"] == 4 and settings["global_attn_indexes"] == (1,)
    assert settings["img_size"] == 64 and settings["patch_size"] == 8 and settings["out_chans"] == 32
    port = ImageEncoderViT(**settings)
    port.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(port.eval()(x), original(x), atol=1e-6, rtol=0)


def write_sam_folder(folder: Path, reference, image_size: int | None = None, head: bool = False) -> Path:
    """A model folder as a user makes one: Meta's checkpoint layout (the whole SAM's state dict, saved by
    `torch.save`; the prompt encoder and mask decoder tensors are not used) and a sam.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = reference_encoder(reference)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 32)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 32)
    torch.save(state, folder / "sam_tiny.pth")
    description = {"checkpoint": "sam_tiny.pth", "labels": ["background", "whole tumour"], "spacing": [4.0, 4.0],
                   "title": "SAM (tiny, random weights)", "modality": "MR"}
    if image_size:
        description["image_size"] = image_size
    (folder / "sam.json").write_text(json.dumps(description))
    return folder


def test_a_sam_folder_loads_metas_checkpoint_layout_as_the_reference_computes_it(reference, tmp_path):
    folder = write_sam_folder(tmp_path / "sam", reference, image_size=64)
    rows, problems = list_models(tmp_path)
    assert not problems
    row = next(r for r in rows if r.id == "sam")
    assert row.format == "segment_anything" and row.status == "available"
    card = model_card(str(folder))
    assert card.spatial_dims == 2 and card.patch_size == (64, 64) and card.extra["trained_in_full"] == ["head"]
    model = load_model(str(folder))
    original = reference_encoder(reference)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.network.image_encoder(x), original(x), atol=1e-6, rtol=0)
        assert model.network(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert load_model(str(folder)).base_fingerprint == model.base_fingerprint  # the new head starts alike


def test_a_smaller_image_size_resizes_the_position_tables(reference, tmp_path):
    folder = write_sam_folder(tmp_path / "sam", reference, image_size=32)
    encoder = load_model(str(folder)).network.image_encoder
    assert encoder.pos_embed.shape == (1, 4, 4, 48)
    assert encoder.blocks[1].attn.rel_pos_h.shape == (7, 16)  # the global block: 2 × 4 − 1 positions
    assert encoder.blocks[0].attn.rel_pos_h.shape == (7, 16)  # a window block keeps its 4-token window's table
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 32, 4, 4)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(reference, tmp_path):
    folder = write_sam_folder(tmp_path / "sam", reference)
    _Payload.marker = str(tmp_path / "ran")
    torch.save({"image_encoder.pos_embed": _Payload()}, folder / "sam_tiny.pth")
    with pytest.raises(ModelError, match=r"sam_tiny\.pth: refused to load"):
        load_model(str(folder))
    assert not (tmp_path / "ran").exists()


def test_an_encoder_without_relative_position_tables_is_refused_not_guessed(reference, tmp_path):
    """Its heads and windows cannot be read from the tensors (the attention would be built with made-up ones)."""
    folder = write_sam_folder(tmp_path / "sam", reference)
    state = torch.load(folder / "sam_tiny.pth", weights_only=True)
    torch.save({k: v for k, v in state.items() if "rel_pos" not in k}, folder / "sam_tiny.pth")
    with pytest.raises(ModelError, match=r"sam_tiny\.pth: not a segment-anything image encoder \(no relative-pos"):
        load_model(str(folder))


@pytest.mark.parametrize("description, message", [
    ({"labels": ["background", "x"]}, "field 'checkpoint'"),
    ({"checkpoint": "../elsewhere.pth", "labels": ["background", "x"]}, "inside the model folder"),
    ({"checkpoint": "sam_tiny.pth", "labels": ["background"]}, "field 'labels'"),
    ({"checkpoint": "sam_tiny.pth", "labels": ["background", "x"], "image_size": "big"}, "field 'image_size'"),
    ({"checkpoint": "missing.pth", "labels": ["background", "x"]}, "missing.pth: file is missing"),
])
def test_a_wrong_sam_description_is_one_line_naming_the_field(reference, tmp_path, description, message):
    folder = write_sam_folder(tmp_path / "sam", reference)
    (folder / "sam.json").write_text(json.dumps(description))
    with pytest.raises(ModelError, match=message):
        load_model(str(folder))


def test_seapeft_pool_on_sam_puts_qv_lora_on_the_fused_qkv_and_lora_on_the_mlp(reference, tmp_path):
    network = load_model(str(write_sam_folder(tmp_path / "sam", reference, image_size=64))).network
    sites = {}
    for unit in build_pool(network, families=("lora", "lora_qv")):
        sites.setdefault(unit.site, set()).add(unit.unit)
    for block in range(3):
        assert any(u.startswith("sea_lora_qv") for u in sites[f"image_encoder.blocks.{block}.attn.qkv"])
        assert any(u.startswith("sea_lora_r") for u in sites[f"image_encoder.blocks.{block}.mlp.lin1"])


def png_slices(folder: Path) -> dict[int, tuple[Path, Path]]:
    """Per patient (3, 4, 6): the T1c slice through the tumour as a PNG and its whole-tumour label as a PNG."""
    files = {}
    for patient in (3, 4, 6):
        image, label = brats_slice(patient, "T1c")
        files[patient] = (as_png(image, folder / f"p{patient}.png"), folder / f"p{patient}_label.png")
        sitk.WriteImage(label, str(files[patient][1]))
    return files


def test_a_sam_model_adapts_its_query_value_rows_and_new_head_and_predicts_on_the_images_geometry(reference,
                                                                                                  tmp_path):
    folder = write_sam_folder(tmp_path / "sam", reference, image_size=64)
    files = png_slices(tmp_path)
    client = JobClient(tmp_path / "jobs")
    job = client.submit(JobSpec(
        model=str(folder), support=[CaseSpec([str(files[3][0])], str(files[3][1]))],
        audit=[CaseSpec([str(files[4][0])], str(files[4][1]))], predict=[CaseSpec([str(files[6][0])])],
        method=make_method("lora-qv", rank=2),
        train=TrainSpec(steps=6, lr=3e-3, patches_per_step=2, audit_every=3, seed=0, device="cpu")))
    state = job.wait(timeout=300)
    assert state.outcome == "finished", state.message
    started = next(e for e in job.events if e["event"] == "started")
    network = load_model(str(folder)).network
    head = sum(p.numel() for p in network.head.parameters())
    qv = 3 * 2 * (2 * 48 + 2 * 48)  # per block: a rank-2 pair on the q rows and one on the v rows (48 → 48)
    assert started["trained_in_full"] == head
    assert started["trainable"] == head + qv
    units = read_adapter_config(job.adapter_folder)["units"]
    assert {(u["kind"], u["layer"].split(".")[0]) for u in units} == {("lora_qkv", "image_encoder"),
                                                                     ("dense", "head")}
    assert all(u["layer"].endswith("attn.qkv") for u in units if u["kind"] == "lora_qkv")
    prediction = job.prediction_paths()[0]
    written, original = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(files[6][0]))
    assert same_geometry(written, original)
    assert set(np.unique(sitk.GetArrayViewFromImage(written))) <= {0, 1}
    again = client.submit(JobSpec(model=str(folder), task="predict", predict=[CaseSpec([str(files[6][0])])],
                                  adapter=str(job.adapter_folder), train=TrainSpec(device="cpu")))
    assert again.wait(timeout=300).outcome == "finished", again.state.message
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(again.prediction_paths()[0])))
            == sitk.GetArrayFromImage(written)).all()  # the saved adapter holds the trained head


def test_a_new_head_is_not_used_to_predict_before_an_adaptation(reference, tmp_path):
    folder = write_sam_folder(tmp_path / "sam", reference, image_size=64)
    image = as_png(brats_slice(6, "T1c")[0], tmp_path / "p6.png")
    with pytest.raises(InputError, match=r"'sam' has an untrained part \(head\).*adapt it first"):
        JobClient(tmp_path / "jobs").submit(JobSpec(model=str(folder), task="predict", predict=[CaseSpec([str(image)])],
                                                    train=TrainSpec(device="cpu")))
    assert not list((tmp_path / "jobs").glob("*/job.json"))  # refused before a job was written


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """`peftadapt adapt` on a SAM folder without a head file, as the user-level check ran it (its untrained head once
    scored best on the audit, and was kept): the folder, the job folder and the command's result."""
    tmp_path = tmp_path_factory.mktemp("headless")
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = write_sam_folder(tmp_path / "sam", import_reference(monkeypatch), image_size=64)
    files = png_slices(tmp_path)
    job = tmp_path / "job"
    result = run("adapt", "--model", str(folder), "--train", *map(str, files[3]), "--audit", *map(str, files[4]),
                 "--method", "lora-qv", "--steps", "6", "--audit-every", "3", "--device", "cpu",
                 "--predict", str(files[6][0]), "--output", str(job))
    return folder, job, files, result


def test_a_new_heads_untrained_start_is_never_kept_the_best_trained_state_is(headless):
    """Found by a user-level check: the untrained head was kept as "the source model" (every pixel tumour), in a
    garbled sentence, and its predictions written."""
    _, job, _, result = headless
    assert result.returncode == 0, result.stderr
    validation = next(e for e in read_events(job)[0] if e["event"] == "validation")
    assert validation["kept"] == "adapted" and "gain" not in validation  # nothing to compare with
    assert read_adapter_config(job / "adapter")["metadata"]["best_step"] > 0
    assert "result: adapted state of step" in result.stdout
    assert "there is no source model to compare it with, as the model's head is new" in result.stdout
    assert "audit Dice: kept" in result.stdout and "start" not in result.stdout.split("audit Dice:")[1].split("\n")[0]
    assert "wrote " in result.stdout and list((job / "predictions").glob("p6_seg.png"))
    # the one-volume caveat speaks of the audit's Dice, not of a gain over a source there is none of
    warnings = " ".join(e["message"] for e in read_events(job)[0] if e["event"] == "warning")
    assert "the audit is one volume (p4), so its Dice is shown on that volume only" in warnings
    assert "gain" not in warnings + result.stdout + result.stderr


def test_predict_refuses_an_adapter_that_holds_the_untrained_head(headless, tmp_path):
    """An adapter an earlier version kept at step 0 of a new head (its metadata: `trained_in_full`, `best_step` 0):
    `predict --adapter` refuses it in one line, before a job is made."""
    folder, job, files, _ = headless
    adapter = tmp_path / "adapter"
    shutil.copytree(job / "adapter", adapter)
    config = json.loads((adapter / "adapter.json").read_text())
    assert config["metadata"]["trained_in_full"] > 0
    config["metadata"]["best_step"] = 0
    (adapter / "adapter.json").write_text(json.dumps(config))
    output = tmp_path / "seg.png"
    assert_one_line_error(run("predict", "--model", str(folder), "--adapter", str(adapter), "--image",
                              str(files[6][0]), "--output", str(output)),
                          f"{adapter}: this adapter holds the model's new head untrained")
    assert not output.exists()


def test_the_trainable_line_says_how_much_is_adapter_and_how_much_new_head(headless):
    """Found by a user-level check: a 1 % method printed 14 % trainable, the new head counted in without a word."""
    folder, _, _, result = headless
    network = load_model(str(folder)).network
    head, total = sum(p.numel() for p in network.head.parameters()), sum(p.numel() for p in network.parameters())
    adapter = 3 * 2 * (2 * 48 + 2 * 48)  # rank 2 on the q and v rows of 3 blocks
    assert (f"trainable: {head + adapter:,} of {total:,} parameters ({100 * (head + adapter) / total:.2f} %): "
            f"{adapter:,} adapter ({100 * adapter / total:.2f} %) + {head:,} new head trained in full") in result.stdout


def test_a_patch_size_other_than_a_vits_own_is_refused_before_a_job(headless, tmp_path):
    """Found verifying the 2D fixes: `--patch-size 48` on a ViT (position embeddings for its own size only) made a
    job whose worker failed in a RuntimeError ("The size of tensor a (9) must match …")."""
    folder, _, files, _ = headless
    result = run("adapt", "--model", str(folder), "--train", *map(str, files[3]), "--method", "lora-qv",
                 "--patch-size", "48", "--steps", "2", "--output", str(tmp_path / "job"))
    assert_one_line_error(result, "takes inputs of its own size only (64×64")
    assert not (tmp_path / "job").exists()
