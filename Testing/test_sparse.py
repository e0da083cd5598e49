"""Sparse supervision: a label counts only on the slices a user annotated. The loss gives unannotated voxels no
gradient, patches centre on annotated voxels, the held-out audit is made of annotated slices nobody trained on, and
a job with a slice list runs through the command line and the worker."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss

from conftest import REPO, shared
from test_labelfree import SPINE_CARD  # the spine source model's grid (1 mm, RAS): the hold-out needs no weights
from PEFTAdaptLib.data.cases import load_case, prepare_case
from PEFTAdaptLib.data.holdout import hold_out_annotated, split_for_audit
from PEFTAdaptLib.data.sparse import UNANNOTATED, annotated, slice_mask, touched_slices, write_slice_mask
from PEFTAdaptLib.data.transforms import to_array
from PEFTAdaptLib.errors import InputError
from PEFTAdaptLib.jobs import CaseSpec, JobClient, JobSpec, TrainSpec
from PEFTAdaptLib.methods import make_method
from PEFTAdaptLib.models.registry import load_model
from PEFTAdaptLib.selection import AuditCounts
from PEFTAdaptLib.training import MaskedDiceCE, PatchSampler
from PEFTAdaptLib.vouch import AUDIT_COVERS, same_volume_audit, volume_digest
from PEFTAdaptLib.worker import EXIT_INVALID

MESHNET = "meshnet/model5_gw_ae"
T1 = "meshnet/t1_crop.nii.gz"


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """A real T1 slab (40 coronal slices) and a bright-tissue label on it, as files."""
    folder = tmp_path_factory.mktemp("thin")
    image = sitk.ReadImage(str(shared(T1)))[:, :, 100:140]
    label = sitk.Cast(image > float(np.percentile(sitk.GetArrayViewFromImage(image), 70)), sitk.sitkUInt8)
    label.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "thin.nii.gz"))
    sitk.WriteImage(label, str(folder / "thin_label.nii.gz"))
    return folder


def test_voxels_outside_the_annotated_mask_get_no_gradient():
    """Real MeshNet on a real T1 patch: the loss's gradient w.r.t. the logits is zero off the mask (so what the
    network predicts there cannot move any weight), while the annotated slices train every layer."""
    model = load_model(shared(MESHNET))
    case = prepare_case("t1", [sitk.ReadImage(str(shared(T1)))], model.card)
    image = torch.from_numpy(case.array[None, :, 60:100, 60:100, 60:100].copy())
    truth = (image > image.mean()).long()
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[..., 15:18] = True  # three annotated slices
    loss_fn = MaskedDiceCE()

    logits = model.network(image)
    logits.retain_grad()
    loss_fn(logits, torch.where(mask, truth, UNANNOTATED)).backward()
    assert logits.grad[..., 15:18].abs().sum() > 0
    assert logits.grad[..., :15].abs().max() == 0 and logits.grad[..., 18:].abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.network.parameters())
    # fully annotated: exactly MONAI's DiceCELoss, the loss dense jobs trained with before
    logits = model.network(image).detach()
    assert torch.allclose(loss_fn(logits, truth), DiceCELoss(to_onehot_y=True, softmax=True)(logits, truth))


def test_patches_centre_on_annotated_voxels():
    label = np.full((1, 64, 64, 64), UNANNOTATED, np.uint8)
    label[0, :, :, 40] = 0
    label[0, 20:30, 20:30, 40] = 1
    image = np.random.default_rng(0).random((1, 64, 64, 64), dtype=np.float32)
    case = type("C", (), {"array": image, "label": label})
    sampler = PatchSampler([case], (16, 16, 16), 8, 0.5, seed=0)
    for _ in range(3):
        _, patch = sampler()
        assert (patch != UNANNOTATED).any(dim=(1, 2, 3, 4)).all()  # every patch holds annotated voxels


def test_the_held_out_audit_of_a_sparse_case_is_whole_annotated_slices_nobody_trains_on(thin):
    card = load_model(shared(MESHNET)).card
    image = sitk.ReadImage(str(thin / "thin.nii.gz"))
    mask = slice_mask(image, "coronal:5,12,20,27,34")
    case = prepare_case("thin", [image], card, sitk.ReadImage(str(thin / "thin_label.nii.gz")), annotated=mask)
    [train], [audit], [held] = split_for_audit([case])
    marked, kept, audited = annotated(case.label[0]), annotated(train.label[0]), annotated(audit.label[0])
    assert not (kept & audited).any() and np.array_equal(kept | audited, marked)
    planes = np.flatnonzero(audited.any(axis=(0, 1)))
    assert held["slices"] == planes.tolist() and len(planes) >= 1
    assert all(audited[..., z].sum() == marked[..., z].sum() for z in planes)  # whole slices
    # one corrected slice: held out within the slice, still disjoint, the audit's units are strips of it
    one = prepare_case("thin", [image], card, sitk.ReadImage(str(thin / "thin_label.nii.gz")),
                       annotated=slice_mask(image, "coronal:20"))
    [train], [audit], [held] = split_for_audit([one])
    assert held["slices"] == [20] and held["within"]["axis"] == 0
    assert not (annotated(train.label[0]) & annotated(audit.label[0])).any()
    counts = AuditCounts.measure(audit.label[0], audit.label[0], card.num_classes,
                                 annotated=annotated(audit.label[0]))
    assert len(counts) > 1 and AuditCounts([counts]).dice() == 1.0


def image_index(case, axis: int) -> np.ndarray:
    """Per model voxel along the model's `axis`, the index along the image's `axis` of the voxel nearest its centre
    (where nearest-neighbour resampling took its label from), found through physical space."""
    centre = [s // 2 for s in case.array.shape[1:]]

    def along(i: int) -> int:
        point = case.model_image.TransformIndexToPhysicalPoint([i if a == axis else c for a, c in enumerate(centre)])
        return case.image.TransformPhysicalPointToIndex(point)[axis]
    return np.array([along(i) for i in range(case.array.shape[1 + axis])])


@pytest.mark.parametrize("slices", ["axial:4", "axial:4,5", "axial:3,4,5", "axial:2,4,6"])
def test_what_came_from_one_slice_on_a_thick_axis_is_held_out_or_trained_whole(slices, tmp_path):
    """The real spinal-cord T2* has 9 axial slices of 7.5 mm; on the spine model's 1 mm grid each becomes ~7 copies. The
    audit never holds out some copies of an annotated slice while training on the others (an audit of the training
    data itself): adjacent slices are held out whole; a single slice gives up a strip of its own lines."""
    image = shared("spine/t2s/t2s.nii.gz")
    mask = write_slice_mask(image, slices, tmp_path / "mask.nii.gz")
    case = load_case(image, SPINE_CARD, shared("spine/t2s/t2s_seg.nii.gz"), annotated_path=mask)
    train, audit, held = hold_out_annotated(case)
    trained, audited = annotated(train.label[0]), annotated(audit.label[0])
    assert not (trained & audited).any() and np.array_equal(trained | audited, annotated(case.label[0]))
    assert held["plane"] == "axial" and held["axis"] == 2
    slice_of = image_index(case, 2)  # the image slice each model plane came from
    audited_slices = set(slice_of[audited.any(axis=(0, 1))])
    assert audited_slices == set(held["slices"])
    if slices == "axial:4":  # the documented within-slice slab: the audit's image lines are never trained on
        line_of = image_index(case, 0)
        assert held["slices"] == [4] and held["within"]["axis"] == 0
        assert set(line_of[audited.any(axis=(1, 2))]) == set(held["within"]["indices"])
        assert not set(line_of[audited.any(axis=(1, 2))]) & set(line_of[trained.any(axis=(1, 2))])
    else:
        assert "within" not in held and not audited_slices & set(slice_of[trained.any(axis=(0, 1))])


def test_a_block_of_thin_slices_on_a_coarser_model_grid_gives_up_a_slab_not_every_other_slice(tmp_path):
    """The T2*'s sagittal slices are 0.5 mm; the spine model's 1 mm grid samples every other one. A block of adjacent
    corrected slices is one run (a slab of it is held out), not 13 runs of one slice each, held out every few slices
    between trained neighbours 0.5 mm away (found reviewing the image-grid hold-out). Its 20 slices outnumber the
    volume's 9 axial ones: still the sagittal slices are divided (the axial ones were, all annotated in part)."""
    image = shared("spine/t2s/t2s.nii.gz")
    mask = write_slice_mask(image, "sagittal:" + ",".join(map(str, range(14, 34))), tmp_path / "mask.nii.gz")
    case = load_case(image, SPINE_CARD, shared("spine/t2s/t2s_seg.nii.gz"), annotated_path=mask)
    train, audit, held = hold_out_annotated(case)
    axis = held["axis"]
    slice_of = image_index(case, axis)
    across = tuple(a for a in range(3) if a != axis)
    audited = set(slice_of[annotated(audit.label[0]).any(axis=across)])
    trained = set(slice_of[annotated(train.label[0]).any(axis=across)])
    assert held["plane"] == "sagittal" and audited and trained
    assert not any(min(audited) < t < max(audited) for t in trained)  # one slab: no trained slice inside it


def test_a_slice_between_the_model_grids_samples_is_refused_under_the_users_name(tmp_path):
    """A 0.5 mm sagittal slice of the T2* that the 1 mm model grid steps over is refused asking for more slices;
    the worker's message named its job copy ("support0_image0") instead of the case (found verifying the fixes)."""
    image = shared("spine/t2s/t2s.nii.gz")
    mask = write_slice_mask(image, "sagittal:20", tmp_path / "mask.nii.gz")
    with pytest.raises(InputError, match=r"^my t2s: no annotated voxel reaches the model's grid"):
        load_case(image, SPINE_CARD, shared("spine/t2s/t2s_seg.nii.gz"), annotated_path=mask, name="my t2s")


def test_a_slice_between_the_model_grids_samples_is_refused_before_a_job_folder_exists(tmp_path):
    """The worker refused such a slice after the job folder was made (left as found at stop 35): the request is now
    refused in one line naming the mask, and nothing is written; a slice the grid reaches makes the job. The bundle's
    1.5 mm grid steps over every third 0.5 mm sagittal slice of the T2* (21 is one, 20 is not)."""
    from test_model_loaders import _write_bundle

    _write_bundle(tmp_path / "model")
    image, label = shared("spine/t2s/t2s.nii.gz"), shared("spine/t2s/t2s_seg.nii.gz")
    client = JobClient(tmp_path / "work")

    def request(index: int) -> JobSpec:
        mask = write_slice_mask(image, f"sagittal:{index}", tmp_path / f"mask{index}.nii.gz")
        return JobSpec(model=str(tmp_path / "model"), method=make_method("bitfit"),
                       support=[CaseSpec([str(image)], str(label), annotated=str(mask))])

    with pytest.raises(InputError, match=r"^\S*mask21.nii.gz: no annotated voxel reaches the model's grid"):
        client.create(request(21), tmp_path / "job")
    assert not (tmp_path / "job").exists()
    assert (client.create(request(20), tmp_path / "job") / "job.json").is_file()


def test_the_held_out_slices_are_named_on_the_image_grid(tmp_path):
    """The real T2 is PSR: its axial slices walk along image axis 1. What the started event says was held out is
    the plane and the image's slice indices the user gave, not the model grid's."""
    image = shared("spine/t2/t2.nii.gz")
    mask = write_slice_mask(image, "axial:10,25,40", tmp_path / "mask.nii.gz")
    case = load_case(image, SPINE_CARD, shared("spine/t2/t2_seg-manual.nii.gz"), annotated_path=mask)
    assert hold_out_annotated(case)[2] == {"case": "t2", "plane": "axial", "axis": 1, "slices": [25]}


def test_a_mask_off_the_image_grid_or_empty_is_refused_naming_the_file(thin, tmp_path):
    image = sitk.ReadImage(str(thin / "thin.nii.gz"))
    shifted = slice_mask(image, "coronal:3")
    shifted.SetOrigin([o + 5 for o in image.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    empty = slice_mask(image, "coronal:3") * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    card = load_model(shared(MESHNET)).card
    for name, problem in (("shifted", "mask geometry"), ("empty", "mask is empty")):
        with pytest.raises(InputError, match=f"{name}.nii.gz: annotated-voxel {problem}"):
            load_case(thin / "thin.nii.gz", card, thin / "thin_label.nii.gz", annotated_path=tmp_path / f"{name}.nii.gz")
    with pytest.raises(InputError, match="between 0 and 39"):
        slice_mask(image, "coronal:40")


def test_touched_slices_are_whole_slices_along_the_axis_the_user_edited():
    start = np.zeros((30, 40, 50), np.int64)
    corrected = start.copy()
    corrected[5:20, 10:30, 7] = 1  # painted on two axial slices
    corrected[8:12, 3:9, 31] = 1
    mask = touched_slices(corrected, start, marked=[(2, 44)])
    assert np.flatnonzero(mask.any(axis=(0, 1))).tolist() == [7, 31, 44] and mask[..., 7].all()


def test_a_slice_list_adapts_through_the_command_line_and_the_worker(thin, tmp_path):
    """`peftadapt adapt --train IMAGE LABEL --slices axial:…`: the mask made from the list is copied into the job,
    the worker audits on held-out annotated slices, and the prediction comes with its uncertainty map and ranking
    on the input's grid. Its audit covers that volume only: another volume it predicts is named for checking, by
    this job and by a later predict job with its adapter."""
    out = tmp_path / "job"
    other = sitk.ReadImage(str(shared(T1)))[:, :, 60:100]  # the same subject, slices nobody trained or audited on
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    command = [sys.executable, "-m", "PEFTAdaptLib.cli", "adapt", "--model", str(shared(MESHNET)),
               "--train", str(thin / "thin.nii.gz"), str(thin / "thin_label.nii.gz"), "--slices", "coronal:4,12,20,28,36",
               "--method", "bitfit", "--steps", "2", "--patches-per-step", "1", "--audit-every", "1", "--device", "cpu",
               "--predict", str(thin / "thin.nii.gz"), "--predict", str(tmp_path / "other.nii.gz"), "--output", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    spec = json.loads((out / "job.json").read_text())
    assert spec["support"][0]["annotated"] == "inputs/support0_annotated.nii.gz"
    mask = to_array(sitk.ReadImage(str(out / spec["support"][0]["annotated"])))
    assert np.flatnonzero(mask.any(axis=(0, 1))).tolist() == [4, 12, 20, 28, 36]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    [held] = next(e for e in events if e["event"] == "started")["audit_held_out"]
    assert held["axis"] == 2 and held["slices"]
    prediction = next(e for e in events if e["event"] == "prediction")
    source = sitk.ReadImage(str(thin / "thin.nii.gz"))
    uncertainty = sitk.ReadImage(str(out / prediction["uncertainty"]))
    disagreement = sitk.ReadImage(str(out / prediction["disagreement"]))  # an adapter was applied
    for produced in (uncertainty, disagreement):
        assert produced.GetSize() == source.GetSize() and np.allclose(produced.GetSpacing(), source.GetSpacing())
        assert np.allclose(produced.GetOrigin(), source.GetOrigin())
        assert np.allclose(produced.GetDirection(), source.GetDirection())
    values = sitk.GetArrayFromImage(uncertainty)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
    ranking = json.loads((out / prediction["slices"]).read_text())["planes"]["coronal"]
    assert ranking["axis"] == 2 and len(ranking["slices"]) > 1
    # the volume predicted is the one being corrected: its 5 corrected slices count as picks and are not listed
    assert not {4, 12, 20, 28, 36} & {s["index"] for s in ranking["slices"]}
    assert [s["reason"] for s in ranking["slices"][:2]] == ["coverage", "uncertain"]
    assert ranking["slices"][1]["score"] == max(s["score"] for s in ranking["slices"])
    # a coverage pick looks where the model may be wrong with confidence: the view centres on the slice's image
    content = to_array(source) > to_array(source).min()
    for pick in (s for s in ranking["slices"] if s["reason"] == "coverage"):
        middle = np.round(np.argwhere(content[:, :, pick["index"]]).mean(0)).astype(int).tolist()
        assert pick["at"] == middle + [pick["index"]]
    # its audit was a slab of the training volume: a state kept on it comes with that caveat (this run keeps one)
    kept = next(e for e in events if e["event"] == "validation")["kept"]
    assert kept == "adapted"
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert same_volume_audit([held]) in warnings  # worded by what was held out: whole corrected slices
    assert "the audit was held-out corrected slices of the training volume(s)" in same_volume_audit([held])
    # the volume trained on is covered; the other is named, and the adapter keeps the record for later jobs
    unvouched = [m for m in warnings if "covers only the volume(s) it was trained and audited on" in m]
    assert [m.split(":")[0] for m in unvouched] == ["other"]
    metadata = json.loads((out / "adapter" / "adapter.json").read_text())["metadata"]
    assert metadata[AUDIT_COVERS] == [volume_digest(sitk.ReadImage(str(thin / "thin.nii.gz")))]
    later = JobClient(tmp_path / "work").submit(JobSpec(
        model=str(shared(MESHNET)), task="predict", adapter=str(out / "adapter"),
        predict=[CaseSpec([str(thin / "thin.nii.gz")], name="again"),
                 CaseSpec([str(tmp_path / "other.nii.gz")], name="new")]))
    state = later.wait(timeout=600)
    assert state.succeeded and [w.split(":")[0] for w in state.warnings if "covers only" in w] == ["new"]
    # how much the adapter changed each class: here, and on the held-out annotated slices its audit scored
    assert prediction["change"] and all(0 <= d <= 1 for d in prediction["change"].values())
    checked = json.loads((out / "adapter" / "adapter.json").read_text())["metadata"]["audit_change"]
    assert checked and all(0 <= d <= 1 for d in checked.values())


def test_corrections_that_miss_the_structure_are_refused_asking_for_more(thin, tmp_path):
    """A correction round whose slices hold none of the structure gives nothing to learn from or audit on: the
    worker refuses it before training, and the `failed` event says what it needs, so a front-end (and the
    correction benchmark) can ask for more slices without reading the message."""
    image = sitk.ReadImage(str(thin / "thin.nii.gz"))
    mask = slice_mask(image, "coronal:5")
    label = sitk.ReadImage(str(thin / "thin_label.nii.gz")) * sitk.Cast(mask == 0, sitk.sitkUInt8)  # none on slice 5
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    spec = JobSpec(model=str(shared(MESHNET)), method=make_method("bitfit"),
                   support=[CaseSpec([str(thin / "thin.nii.gz")], str(tmp_path / "label.nii.gz"),
                                     annotated=str(tmp_path / "mask.nii.gz"))],
                   train=TrainSpec(steps=2, patches_per_step=1, audit_every=1, device="cpu"))
    job = JobClient(tmp_path / "work").submit(spec, tmp_path / "work" / "job")
    state = job.wait(timeout=600)
    assert state.outcome == "failed" and state.exit_code == EXIT_INVALID and state.needs == "annotation"
    assert "no annotated voxel holds a structure" in state.message and state.step == 0
    assert state.describe().startswith("More annotation needed: ")


def test_slices_follow_the_train_they_belong_to(thin):
    from PEFTAdaptLib.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["adapt", "--slices", "axial:1", "--output", "x"])
    args = parser.parse_args(["adapt", "--train", "a", "b", "--train", "c", "d", "--annotated", "m", "--output", "x"])
    assert args.sparse == {1: ("annotated", "m")}


def test_a_sparse_case_needs_its_label():
    with pytest.raises(InputError, match="annotated-voxel mask needs its label"):
        CaseSpec(["image.nii.gz"], None, "x", "mask.nii.gz")


def test_sea_peft_adapts_from_sparse_slices(thin, tmp_path):
    """The default method's probes and audit buffer read the sparse label too (worker subprocess)."""
    image = sitk.ReadImage(str(thin / "thin.nii.gz"))
    sitk.WriteImage(slice_mask(image, "coronal:4,12,20,28,36"), str(tmp_path / "mask.nii.gz"))
    request = JobSpec(model=str(shared(MESHNET)),
                      support=[CaseSpec([str(thin / "thin.nii.gz")], str(thin / "thin_label.nii.gz"),
                                        annotated=str(tmp_path / "mask.nii.gz"))],
                      method=make_method("sea-peft"),
                      train=TrainSpec(steps=2, patches_per_step=1, audit_every=1, device="cpu"))
    job = JobClient(tmp_path / "work").submit(request)
    state = job.wait(timeout=900)
    assert state.outcome == "finished", state.message


def test_the_ranking_defers_neighbours_of_picked_and_corrected_slices():
    from PEFTAdaptLib.uncertainty import ranked

    scores = [0, 5, 4, 0, 3, 1, 0, 2.5, 0.5]
    order = ranked(scores)
    assert [i for i, reason in order if reason == "uncertain"] == [1, 8, 2, 4, 7]  # 8: the best beyond 1's and 5's
    assert [i for i, reason in order if reason == "coverage"] == [5, 3, 0, 6]  # farthest from every pick and end
    assert sorted(i for i, _ in order) == list(range(9))
    assert ranked(scores, taken=[1])[:2] == [(5, "coverage"), (8, "uncertain")]  # a corrected slice counts as a pick


def test_the_ranking_looks_where_the_model_is_confidently_wrong():
    """A structure the model misses with confidence has no uncertainty: half the picks cover the rest of the
    volume, so the first few reach the half of it where nothing was predicted (the old ranking never went there)."""
    from PEFTAdaptLib.uncertainty import ranked

    scores = [5.0 - 0.1 * i for i in range(10)] + [0.0] * 30  # uncertain only near the (misplaced) prediction
    order = ranked(scores, extent=(0, 35))  # slices 36–39 hold no image
    assert order[1][0] >= 10 and max(index for index, _ in order[:4]) >= 20  # the old ranking: 0, 3, 6, 9
    assert all(index <= 35 for index, reason in order if reason == "coverage")
    assert {index for index, _ in order} == set(range(36))
