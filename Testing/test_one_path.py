"""One path for every front-end: the command line, the Slicer scene logic and the benchmarks build the same
`job.json` for the same request, byte for byte."""
from __future__ import annotations

import sys

import SimpleITK as sitk

from conftest import REPO, shared
from slicer_scene import load_segmentation, load_volume, new_scene

from PEFTAdaptLib.cli import adapt_request, build_parser  # noqa: E402
from PEFTAdaptLib.jobs import TrainSpec  # noqa: E402
from PEFTAdaptLib.jobs import JobClient, create_job  # noqa: E402
from PEFTAdaptLib.methods import Budget, make_method  # noqa: E402
from PEFTAdaptLib.mrml.logic import AdaptationRequest, SceneLogic  # noqa: E402


def test_the_cli_the_slicer_logic_and_the_benchmarks_write_the_same_job_json(tmp_path):
    files = {}
    for role, patient in (("support", 3), ("audit", 4), ("test", 5)):
        folder = shared(f"brats/brats_2013_pat000{patient}_1")
        for part, name in (("image", "T1c_subtrMeanDivStd.nii.gz"), ("label", "brainmask.nii.gz")):
            files[role, part] = tmp_path / f"{role}_{part}.nrrd"
            sitk.WriteImage(sitk.ReadImage(str(folder / name)), str(files[role, part]))

    args = build_parser().parse_args([
        "adapt", "--train", str(files["support", "image"]), str(files["support", "label"]),
        "--audit", str(files["audit", "image"]), str(files["audit", "label"]), "--predict", str(files["test", "image"]),
        "--method", "lora", "--budget", "1%", "--patch-size", "64", "--device", "cpu", "--output", "unused"])
    cli = create_job(tmp_path / "cli", adapt_request(args))

    scene = new_scene()
    logic = SceneLogic(scene, JobClient(tmp_path / "slicer-work"))
    volume = {role: load_volume(scene, files[role, "image"], f"{role}_image") for role in ("support", "audit", "test")}
    segmentation = {role: load_segmentation(scene, files[role, "label"], volume[role], f"{role} brain", "brain")
                    for role in ("support", "audit")}
    request = AdaptationRequest(modelId="deepbet-brain", trainingPairs=[(volume["support"], segmentation["support"])],
                                auditPairs=[(volume["audit"], segmentation["audit"])], method="lora", budgetPercent=1.0,
                                patchSize=64, device="cpu", targetVolumes=[volume["test"]])
    (tmp_path / "export").mkdir()
    slicer = create_job(tmp_path / "slicer", logic.jobRequest(request, tmp_path / "export"))

    sys.path.insert(0, str(REPO / "bench"))
    from product import Settings
    from product import request as bench_request
    from shifts import CaseFiles, Shift

    case = lambda role: CaseFiles(f"{role}_image", str(files[role, "image"]), str(files[role, "label"]))  # noqa: E731
    shift = Shift("same", "same", "deepbet-brain", [case("support")], [case("audit")], [case("test")], {1: "brain"})
    defaults = TrainSpec()  # the defaults every front-end leaves to the job spec
    settings = Settings(defaults.steps, defaults.patches_per_step, [64, 64, 64], defaults.audit_every)
    bench = create_job(tmp_path / "bench", bench_request(shift, make_method("lora", budget=Budget(fraction=0.01)),
                                                         settings, seed=0))

    reference = (cli / "job.json").read_bytes()
    assert (slicer / "job.json").read_bytes() == reference
    assert (bench / "job.json").read_bytes() == reference
    assert sorted(p.name for p in (cli / "inputs").iterdir()) == sorted(p.name for p in (slicer / "inputs").iterdir())


def test_a_benchmark_result_saved_by_another_checkout_of_the_cache_counts_as_the_same_request():
    """A worktree (or a clone beside it) shares bench/.cache: its saved requests name the cache through another
    path, and must still match this checkout's request, while any other difference must not."""
    sys.path.insert(0, str(REPO / "bench"))
    from product import here, portable
    from shifts import CACHE

    def request(root, seed=0):
        return {"model": f"{root}/models/spine", "support": [{"images": [f"{root}/cases/spine-t1/a.nii.gz"]}],
                "predict": [{"images": ["/data/elsewhere/b.nii.gz"]}], "train": {"seed": seed}}

    elsewhere = "/work/another-tree/bench/.cache"
    assert portable(request(elsewhere)) == portable(request(CACHE))
    assert portable(request(elsewhere, seed=1)) != portable(request(CACHE))
    assert portable(request(elsewhere))["predict"] == request(CACHE)["predict"]  # paths outside the cache stay
    assert here(f"{elsewhere}/jobs/spine-t1/x_seg.nii.gz") == CACHE / "jobs/spine-t1/x_seg.nii.gz"
