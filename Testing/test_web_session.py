"""The browser app's server side without a browser: files in as nodes (checked as the command line checks them),
downloads on the volume's grid, the views' rendering of a segmentation over its volume, and the charts."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared

from PEFTAdaptLib.data.io import read_image, same_geometry  # noqa: E402
from PEFTAdaptLib.errors import InputError  # noqa: E402

SPINE_IMAGE, SPINE_LABEL = "spine/t2/t2.nii.gz", "spine/t2/t2_seg-manual.nii.gz"
BRATS_IMAGE, BRATS_MASK = "brats/brats_2013_pat0006_1/T1c_subtrMeanDivStd.nii.gz", "brats/brats_2013_pat0006_1/brainmask.nii.gz"


@pytest.fixture
def app(tmp_path, monkeypatch):
    return new_app(tmp_path, monkeypatch)


def new_app(tmp_path, monkeypatch):
    """The real app object on its own trame server (not started: nothing is served)."""
    if not os.environ.get("DISPLAY"):
        monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    monkeypatch.setenv("TRAME_ARGS", "")
    from trame.app import get_server

    from PEFTAdaptLib.web.app import WebApp

    app = WebApp(get_server(f"test-{tmp_path.name}", client_type="vue3"), tmp_path / "work")
    assert app.state.message == ""  # built without a control failing
    return app


def test_models_of_the_model_folder_that_cannot_be_offered_are_said(tmp_path, monkeypatch):
    """As in the Slicer panel: a model placed in the model folder and not offered is said, with why."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "registry.json").write_text("[]")
    monkeypatch.setenv("PEFTADAPT_MODELS", str(models))
    app = new_app(tmp_path, monkeypatch)
    assert app.state.unlisted_models == [f"{models / 'registry.json'}: holds no registry entry (an empty list); "
                                         "describe the model or delete the file"]


def test_files_become_nodes_or_one_line_naming_the_file(app, tmp_path):
    session, model = app.session, app.state.model_id
    volume = session.load_volume(shared(BRATS_IMAGE), model, "pat0006/T1c.nii.gz")
    assert volume.GetName() == "pat0006/T1c" and volume.GetImageData().GetDimensions() == (240, 240, 155)
    segmentation = session.load_label(shared(BRATS_MASK), volume, model, "pat0006/brainmask.nii.gz")
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "brain"  # the model's class name and colour, as a prediction would be
    assert np.allclose(segment.GetColor(), app.session.logic.card(model)["labels"][1]["color"])

    wrong_values = tmp_path / "classes.nii.gz"
    mask = sitk.ReadImage(str(shared(BRATS_MASK)))
    sitk.WriteImage(mask * 3, str(wrong_values))
    other_grid = tmp_path / "grid.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30, 30), np.uint8)), str(other_grid))
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkFloat32), str(flat))
    cases = [(lambda: session.load_label(wrong_values, volume, model, "mine.nii.gz"), "label values [3]"),
             (lambda: session.load_label(other_grid, volume, model, "mine.nii.gz"), "same grid"),
             (lambda: session.load_label(other_grid, None, model, "mine.nii.gz"), "choose the volume"),
             (lambda: session.load_volume(flat, model, "flat.nii.gz"), "is 3D: a volume")]
    nodes = app.slicer.scene.GetNumberOfNodes()
    for attempt, expected in cases:
        with pytest.raises(InputError) as refused:
            attempt()
        text = str(refused.value)
        assert expected in text and "\n" not in text
        assert str(tmp_path) not in text or "mine" not in text  # named as the user knows the file
    assert app.slicer.scene.GetNumberOfNodes() == nodes  # nothing half-loaded


def test_labels_in_another_numbering_load_through_a_label_map_uploaded_or_in_the_data_folder(app, tmp_path):
    """Found by a user-level check: a FreeSurfer user's aseg (values 2/41…) was refused by the browser app with no way
    round it; the command line's --label-map had no counterpart there."""
    volume = app.session.load_volume(shared(BRATS_IMAGE), app.state.model_id, "pat0006/T1c.nii.gz")
    mask = sitk.ReadImage(str(shared(BRATS_MASK)))
    inside = sitk.GetArrayFromImage(mask) > 0
    numbered = np.where(inside, 41, 24).astype(np.int16)  # 24: a structure the model has no class for
    numbered[:, :, :120][inside[:, :, :120]] = 2
    aseg = sitk.GetImageFromArray(numbered)
    aseg.CopyInformation(mask)
    content = sitk.WriteImage(aseg, str(tmp_path / "aseg.nii.gz")) or (tmp_path / "aseg.nii.gz").read_bytes()
    app.state.load_as, app.state.label_of = "label", volume.GetID()
    app.upload([{"name": "aseg.nii.gz", "content": content}])
    assert app.state.message_kind == "error" and "label values [2, 24, 41]" in app.state.message

    app.upload([{"name": "to-brain.json", "content": b'{"brain": [2, 41]}'}])
    assert app.state.label_map == "uploaded to-brain.json" and "uploaded to-brain.json" in app.state.label_maps
    app.upload([{"name": "aseg.nii.gz", "content": content}])
    assert app.state.message_kind == "info", app.state.message
    assert app.state.message.endswith("its labels mapped onto the model's classes by uploaded to-brain.json")
    segmentation = app.session.segmentations()[-1]
    name, data = app.session.segmentation_file(segmentation, "nii.gz", app.state.model_id)
    loaded = sitk.GetArrayFromImage(sitk.ReadImage(str(app.session.work_dir / "downloads" / name)))
    assert np.array_equal(loaded, inside.astype(loaded.dtype))

    data = tmp_path / "data"  # a map in the data folder is listed and named as the user knows it when it is wrong
    data.mkdir()
    (data / "wrong.json").write_text('{"white matter": [2]}')
    app.session.data_dir, app.state.label_map = data, "wrong.json"
    app.upload([{"name": "aseg.nii.gz", "content": content}])
    assert app.state.message == ("wrong.json: 'white matter' is not a class of model 'deepbet-brain' (its classes: "
                                 "background, brain)")


def test_freesurfer_volumes_load_as_the_engine_reads_them_and_a_model_folder_loaded_again_is_listed_once(app, tmp_path):
    """Found by a user-level check: the browser app refused FreeSurfer's .mgz ("could not read volume": MRML without
    Slicer's readers has none for it), though it offers to upload one and a job reads it; and a model folder loaded
    twice was listed, and shown selected, twice."""
    from PEFTAdaptLib.mrml.scene_io import write_volume

    norm, aseg = shared("freesurfer/bert/norm.mgz"), shared("freesurfer/bert/aseg.mgz")
    volume = app.session.load_volume(norm, app.state.model_id, "bert/norm.mgz")
    engine = read_image(norm)
    shown = sitk.ReadImage(str(write_volume(volume, tmp_path / "shown.nrrd")))  # left-handed: Slicer reverses an axis
    shown = sitk.Resample(shown, engine, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(engine))
    label_map = tmp_path / "brain.json"
    label_map.write_text('{"brain": ["1-5000"]}')
    segmentation = app.session.load_label(aseg, volume, app.state.model_id, "bert/aseg.mgz", (label_map, "brain.json"))
    name, _ = app.session.segmentation_file(segmentation, "nii.gz", app.state.model_id)
    written = sitk.ReadImage(str(app.session.work_dir / "downloads" / name))
    assert same_geometry(written, engine)  # the segmentation lies on the grid a job reads
    expected = sitk.GetArrayFromImage(read_image(aseg, what="label")) > 0
    assert np.array_equal(sitk.GetArrayViewFromImage(written) > 0, expected)
    assert expected.sum() > 10 ** 6

    app.session.data_dir, app.state.model_folder = shared("meshnet").parent, "meshnet/model5_gw_ae"
    app.load_model_folder()
    app.load_model_folder()
    assert [m["value"] for m in app.state.models].count("model5_gw_ae") == 1 and app.state.model_id == "model5_gw_ae"


def test_downloads_are_on_the_volumes_grid(app):
    session = app.session
    volume = session.load_volume(shared(SPINE_IMAGE), app.state.model_id, "t2/t2.nii.gz")
    segmentation = session.load_label(shared(SPINE_LABEL), volume, app.state.model_id, "t2/cord.nii.gz")
    reference = sitk.ReadImage(str(shared(SPINE_IMAGE)))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(shared(SPINE_LABEL)))) > 0
    for kind in ("nii.gz", "seg.nrrd"):
        name, data = session.segmentation_file(segmentation, kind, app.state.model_id)
        path = session.work_dir / "downloads" / name
        assert name.endswith(kind) and path.read_bytes() == data  # written in the work folder, then sent
        image = sitk.ReadImage(str(path))
        if kind == "nii.gz":  # the image's own grid (this file's direction is left-handed: Slicer reverses an axis)
            assert same_geometry(image, reference)
        else:  # Slicer's own file: its grid, the same voxel centres
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor)
        assert np.array_equal(sitk.GetArrayFromImage(image) > 0, expected)


def _axial_pixels(app, size=300):
    import vtk
    from vtkmodules.util.numpy_support import vtk_to_numpy

    view = app.slicer.view_manager.get_slice_views()[0]
    window = view.render_window()
    window.SetSize(size, size)
    view.render()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    pixels = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars()).reshape(size, size, -1)[..., :3]
    return pixels[size // 3: 2 * size // 3, size // 3: 2 * size // 3].astype(float).mean(axis=2)


def test_a_segmentation_loaded_before_its_volume_is_shown_leaves_the_image_visible(app):
    """Regression: with trame-slicer 2.0, a segmentation added before a slice view first showed a volume hid the
    slice image wherever the segmentation was visible (a job reopened into an empty scene showed flat colour)."""
    session = app.session
    volume = session.load_volume(shared(BRATS_IMAGE), app.state.model_id, "pat0006/T1c.nii.gz")
    segmentation = session.load_label(shared(BRATS_MASK), volume, app.state.model_id, "pat0006/brain.nii.gz")
    app._on_shown_volume(volume.GetID())  # what choosing it in "Show volume" does
    segmentation.SetDisplayVisibility(False)
    image = _axial_pixels(app)
    segmentation.SetDisplayVisibility(True)
    overlaid = _axial_pixels(app)
    assert image.std() > 20  # the brain's texture, not an empty view
    # the same texture under the half-opaque fill (0.94 here; 0.69 when the fill hid the image)
    assert np.corrcoef(image.ravel(), overlaid.ravel())[0, 1] > 0.85


def test_dice_chart_rounds_continue_the_step_axis_and_units_leave_out_unchosen_candidates(app):
    from PEFTAdaptLib.mrml.monitor import AdaptationMonitor
    from PEFTAdaptLib.mrml.monitor import NOT_KEPT
    from PEFTAdaptLib.web.charts import allocation, dice_figure

    class Run:  # what the charts read of a SceneRun: its monitor and the steps it was asked for
        def __init__(self, name, dice):
            self.monitor = AdaptationMonitor(app.slicer.scene, name)
            self.state = type("State", (), {"steps": 4, "kept": ""})()
            for step, value in dice:
                self.monitor.handle({"event": "audit", "step": step, "dice": value})

    first, second = Run("r1", [(0, 0.90), (2, 0.93), (4, 0.94)]), Run("r2", [(0, 0.94), (2, 0.95)])
    first.monitor.handle({"event": "audit", "step": 6, "dice": 0.96, "gain": 0.06, "gain_low": 0.04,
                          "gain_high": 0.07})
    for unit, state, cost in (("a::lora", "active_guard", 96), ("b::salt", "inactive", 62),
                              ("c::bitfit", "demoting", 8), ("d::dense", "promoting", 40),
                              ("e::dense", "inactive_guard", 40)):
        first.monitor.handle({"event": "unit_state", "step": 0, "unit": unit, "site": unit[0], "family": unit[3:],
                              "cost": cost, "state": state, "utility": 0.5, "rank": 2 if unit == "a::lora" else 0})
    first.monitor.handle({"event": "allocation", "step": 0, "active_units": 2, "budget_used": 104})
    first.monitor.handle({"event": "validation", "step": 6, "dice": 0.955, "kept": "adapted"})
    assert dice_figure([])["layout"]["yaxis"]["range"] == [0, 1]  # before any audit, not plotly's empty -1..4
    figure = dice_figure([first, second])
    assert "range" not in figure["layout"]["yaxis"]  # with audits, their own range: a gain of 0.005 stays visible
    curves = {trace["name"]: trace for trace in figure["data"]}
    assert curves["round 1"]["x"] == [0, 2, 4, 6] and curves["round 2"]["x"] == [6, 8]
    # the state the round delivers is its own mark, not one more audit on the curve
    assert (curves["round 1: kept state"]["x"], curves["round 1: kept state"]["y"]) == ([6], [0.955])
    assert "round 2: kept state" not in curves
    assert curves["zero-shot"]["y"] == [0.90, 0.90] and curves["zero-shot"]["x"] == [0, 10]
    # the gain's 95 % interval as an error bar on the audit that carries one, none elsewhere
    bars = curves["round 1"]["error_y"]
    assert bars["arrayminus"][:3] == bars["array"][:3] == [0, 0, 0]
    assert (bars["arrayminus"][3], bars["array"][3]) == (pytest.approx(0.02), pytest.approx(0.01))
    chart, rows = allocation([first, second])  # round 2 allocated nothing: round 1's allocation is shown
    # the units whose gates are on, as the bars count them (a unit waiting to join or just switched off holds none)
    assert [(row["unit"], row["adapter"], row["state"]) for row in rows] == [("a", "lora r2", "new"),
                                                                           ("c", "bitfit", "leaving")]
    assert chart["data"][0]["x"] == ["a", "c"] and chart["data"][0]["y"] == [96, 8]
    # the one allocation round (step 0) holds to the run's last step: a line, with a marker on the round only
    timeline = chart["data"][1]
    assert (timeline["x"], timeline["y"], timeline["marker"]["size"]) == ([0, 4], [2, 2], [7, 0])
    assert "not kept" not in chart["layout"]["title"]["text"]
    # a run that kept its start trained these units but delivers none of them: both front-ends' views say so
    first.monitor.handle({"event": "validation", "step": 6, "dice": 0.90, "kept": "start"})
    first.state.kept = "start"
    chart, _ = allocation([first, second])
    assert NOT_KEPT in chart["layout"]["title"]["text"] and NOT_KEPT in first.monitor.layers_chart.GetTitle()


def test_a_killed_job_is_listed_interrupted_and_resumes_from_the_jobs_list(app):
    """Issue 17, point 8 in the browser: a worker killed by SIGKILL leaves a job that says it runs; the list shows it
    as interrupted (with why), and Resume continues it from its checkpoint."""
    import signal
    import time

    from PEFTAdaptLib.jobs import CaseSpec, JobSpec, TrainSpec, read_events
    from PEFTAdaptLib.methods import make_method

    image, mask = str(shared(BRATS_IMAGE)), str(shared(BRATS_MASK))
    job = app.session.logic.client.submit(JobSpec(
        "deepbet-brain", support=[CaseSpec([image], mask, "T1c 6")],
        method=make_method("bitfit"), train=TrainSpec(steps=4, patch_size=[64] * 3, patches_per_step=1,
                                                      audit_every=2, checkpoint_every=2, device="cpu")))
    deadline = time.monotonic() + 600
    while not any(e["event"] == "step" and e["step"] >= 3 for e in read_events(job.folder, 0)[0]):
        assert time.monotonic() < deadline and job.process.poll() is None, "the worker did not reach step 3"
        time.sleep(0.2)
    os.kill(job.process.pid, signal.SIGKILL)
    job.process.wait(timeout=60)

    app.refresh_jobs_now()
    [row] = app.state.jobs
    assert row["state"] == "interrupted" and row["resumable"] and "stopped at step" in row["message"]
    app.open_job_folder(job.folder, resume=True)
    assert app.session.running and app.state.message == f"resumed {job.folder.name}"
    # a job with no volume to segment shows its training volume (the views stayed black)
    assert app.state.shown_volume == app.state.pairs[0]["volume"] is not None
    while app.session.running:
        assert time.monotonic() < deadline, "the resumed job did not finish"
        app.session.poll()
        time.sleep(0.3)
    started = [e for e in read_events(job.folder, 0)[0] if e["event"] == "started"]
    assert len(started) == 2 and started[-1]["resumed_from_step"] == 2
    app.refresh_jobs_now()
    assert app.state.jobs[0]["state"] == "finished" and not app.state.jobs[0]["resumable"]


def test_audit_pairs_fill_like_training_pairs_and_a_click_names_no_other_state(app):
    """Issue 18: the app takes a list of audit pairs (it took one) and says what one audit volume vouches for."""
    session, model = app.session, app.state.model_id
    nodes = {}
    for case in (3, 4, 5):
        volume = session.load_volume(shared(f"brats/brats_2013_pat000{case}_1/T1c_subtrMeanDivStd.nii.gz"), model,
                                     f"pat{case}/T1c.nii.gz")
        app._place_volume(volume.GetID())
        label = session.load_label(shared(f"brats/brats_2013_pat000{case}_1/brainmask.nii.gz"), volume, model,
                                   f"pat{case}/brainmask.nii.gz")
        app._place_segmentation(volume.GetID(), label.GetID())
        nodes[case] = volume, label
        if case == 4:  # the server is not started: its change listener is called as a page's edit would call it
            app._on_audit_pairs(app.state.audit_pairs)
            assert app.state.audit_advice.startswith("One audit volume vouches for itself only")
            app.add_pair("audit_pairs")
    app._on_audit_pairs(app.state.audit_pairs)
    assert app.state.audit_advice == ""
    app.add_pair("pairs")  # left empty: no pair
    request = app.request()
    assert request.trainingPairs == [nodes[3]] and request.auditPairs == [nodes[4], nodes[5]]

    pairs = list(app.state.pairs)
    app.add_pair("message")
    assert app.state.message == "no pair list 'message'" and app.state.message_kind == "error"
    app.remove_pair("audit_pairs", 0)
    assert app.request().auditPairs == [nodes[5]] and app.state.pairs == pairs


def _short_run(app, patch: str = "64", steps: str = "4", target: bool = False):
    """The panel filled as a user fills it: a BraTS training pair (audit on its held-out slabs), BitFit on the CPU."""
    session, model = app.session, app.state.model_id
    volume = session.load_volume(shared(BRATS_IMAGE), model, "pat0006/T1c.nii.gz")
    app._place_volume(volume.GetID())
    label = session.load_label(shared(BRATS_MASK), volume, model, "pat0006/brainmask.nii.gz")
    app._place_segmentation(volume.GetID(), label.GetID())
    app.state.targets = [volume.GetID()] if target else []
    app.state.method = "bitfit"
    app._on_method("bitfit")
    app.state.update({"steps": steps, "patch_size": patch, "device": "cpu", "audit_every": "2"})
    return app.request()


def _job_spec(steps: int = 4):
    from PEFTAdaptLib.jobs import CaseSpec, JobSpec, TrainSpec
    from PEFTAdaptLib.methods import make_method

    return JobSpec("deepbet-brain", support=[CaseSpec([str(shared(BRATS_IMAGE))], str(shared(BRATS_MASK)), "T1c 6")],
                   method=make_method("bitfit"), train=TrainSpec(steps=steps, patch_size=[64] * 3, patches_per_step=1,
                                                                 audit_every=2, device="cpu"))


def _other_job(client):
    """A job folder made and not started (as the jobs list shows one)."""
    return client.create(_job_spec())


def _follow_to_the_end(app, timeout: float = 900) -> None:
    """What the server's polling task does between clicks, until the run ends."""
    import time

    deadline = time.monotonic() + timeout
    while app.session.running:
        assert time.monotonic() < deadline, "the job did not end"
        app.follow_once()
        time.sleep(0.3)


def test_while_a_job_runs_no_other_is_opened_and_its_end_shows_the_command_lines_numbers(app):
    """Found by a user-level check: Resume on another job while one trained started a second worker (Open lost
    track of the running one); the finished run never showed the audit gain the CLI prints; the uncertainty map was
    listed as a volume to train on."""
    import asyncio

    _short_run(app, target=True)
    other = _other_job(app.session.logic.client)
    asyncio.run(app.start())
    run = app.session.current.run
    assert app.state.message == f"adaptation started in {run.jobDir}"
    for press in (app.resume_job, app.open_job):
        asyncio.run(press(other.name))
        assert (app.state.message, app.state.message_kind) == (
            "an adaptation is running; cancel it or wait for it to finish", "error")
        assert app.session.current.run is run and app.session.running
    assert not (other / "worker.log").exists()  # no second worker

    _follow_to_the_end(app)
    state = run.state
    assert state.outcome == "finished", state.describe()
    assert state.dice_text.startswith("audit Dice: start ")
    assert app.state.run_text.splitlines()[-1] == state.dice_text  # the command line's words (`peftadapt adapt`)
    assert run.uncertaintyNodes and all(node.GetName().endswith("uncertainty") for node in run.uncertaintyNodes)
    titles = [item["title"] for item in app.state.volumes]
    assert titles == ["pat0006/T1c"], titles  # the overlay is shown over the slices, not picked as a volume


def test_a_run_the_worker_refuses_says_why_as_an_error_and_offers_no_resume(app):
    """Found by a user-level check: a patch larger than every training volume failed in the worker while the message
    line kept saying 'adaptation started', and the job was offered for Resume, which can only fail the same way."""
    import asyncio

    _short_run(app, patch="1024", steps="3")
    asyncio.run(app.start())
    run = app.session.current.run
    assert app.state.message.startswith("adaptation started")
    _follow_to_the_end(app)
    assert run.state.exit_code == 2 and "is larger than every training volume" in run.state.message
    assert (app.state.message, app.state.message_kind) == (run.state.describe().splitlines()[0], "error")
    [row] = app.state.jobs  # listed when the run ended
    assert row["state"] == "failed" and not row["resumable"]
    with pytest.raises(InputError, match="a resume keeps its inputs and settings"):  # the command line's --resume too
        app.session.logic.client.resume(run.jobDir)
    from PEFTAdaptLib.mrml.scene_io import SceneError

    nodes = app.slicer.scene.GetNumberOfNodes()
    with pytest.raises(SceneError, match="the worker refused this one's inputs or settings"):  # the panels' logic
        app.session.logic.openJob(run.jobDir, resume=True)
    assert app.slicer.scene.GetNumberOfNodes() == nodes  # refused before any of its nodes is loaded


def test_a_budget_above_100_percent_is_refused_in_percent(app):
    """Found by a user-level check: 1000 typed in the % field was refused as 'fraction 10.0 must be in (0, 1]'."""
    import asyncio

    app.state.update({"steps": "4", "audit_every": "2", "patch_size": "", "budget_percent": "1000"})
    assert app.state.method_takes_budget
    asyncio.run(app.start())
    assert (app.state.message, app.state.message_kind) == ("budget: '1000' % must be at most 100 %", "error")
    assert app.session.current is None and not list((app.session.work_dir / "jobs").glob("*"))
    app.state.budget_percent = "100"
    assert app.request().budgetPercent == 100


def test_a_ranked_method_takes_its_rank_from_the_budget_unless_one_is_chosen(app):
    """Found by a user-level check: choosing LoRA or ConvLoRA set the rank to 4 beside the budget's 1 %, so Start sent
    both and the job failed ("rank 4 trains 135,100 parameters, more than the budget …"); Slicer's panel offers
    "Automatic (from the budget)" first, and so does this one now."""
    for method in ("lora", "convlora"):
        app.state.method = method
        app._on_method(method)
        assert app.state.method_ranks[0] == {"title": "Automatic (from the budget)", "value": 0}
        assert [item["value"] for item in app.state.method_ranks[1:]] == [1, 2, 4, 8, 16, 32]
        request = app.request()
        assert (request.rank, request.budgetPercent) == (None, 1.0)
        app.state.rank = 2  # a rank the user picks is sent
        assert app.request().rank == 2
    app.state.method = "label-free"
    app._on_method("label-free")
    assert app.state.method_ranks[0] == {"title": "Default (2)", "value": 0} and app.request().rank is None


def test_job_folders_that_are_links_are_not_listed_and_refused_by_open_and_resume(app, tmp_path):
    """Found by a user-level check: links in the jobs folder were listed with what they pointed to, and Open and
    Resume followed them (one to a job outside the work folder)."""
    import asyncio

    from PEFTAdaptLib.jobs import JobClient

    jobs = app.session.logic.client.work_dir
    real = _other_job(app.session.logic.client)
    outside = _other_job(JobClient(tmp_path / "elsewhere"))
    os.symlink(real.name, jobs / "job-link-in")
    os.symlink(outside, jobs / "job-link-out")
    app.refresh_jobs_now()
    assert [row["name"] for row in app.state.jobs] == [real.name]  # listed `invalid`, which is no adaptation job
    for name in ("job-link-in", "job-link-out"):
        for press in (app.open_job, app.resume_job):
            asyncio.run(press(name))
            assert app.state.message_kind == "error" and app.state.message.startswith(f"{jobs / name}: is a symbolic")
    assert app.session.current is None
    assert not (real / "worker.log").exists() and not (outside / "worker.log").exists()  # no worker started


def test_a_ctrl_c_of_the_server_leaves_its_job_training(tmp_path):
    """Found by a user-level check: Ctrl-C on `peftadapt web` (SIGINT to its terminal's process group) cancelled the
    job its worker ran, so a restarted server found nothing running (docs/web.md promises it finds the job again).
    The server here is the real app in a process of its own, leading its process group as a terminal makes it."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO
    from PEFTAdaptLib.jobs import read_events

    # the server as a terminal starts it, Ctrl-C raising KeyboardInterrupt: a runner that starts the tests in the
    # background (a shell without job control) leaves SIGINT ignored, and a child inherits that (the test failed so)
    script = f"""
import signal
import time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
from trame.app import get_server
from PEFTAdaptLib.web.app import WebApp
from test_web_session import _job_spec
app = WebApp(get_server("ctrl-c", client_type="vue3"), Path({str(tmp_path / 'work')!r}))
job = app.session.logic.client.submit(_job_spec(steps=500))
print(job.folder, job.process.pid, flush=True)
while True:
    time.sleep(1)
"""
    env = {**os.environ, "TRAME_ARGS": "", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "Testing"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not env.get("DISPLAY"):
        env["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"
    server = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    worker = None
    try:
        folder, pid = server.stdout.readline().split()
        worker = psutil.Process(int(pid))
        steps = lambda: [e["step"] for e in read_events(Path(folder), 0)[0] if e["event"] == "step"]  # noqa: E731
        deadline = time.monotonic() + 600
        while not steps():  # training: the worker's cancel handler is installed
            assert time.monotonic() < deadline and worker.is_running(), "the worker did not start training"
            time.sleep(0.3)
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the server's terminal
        assert server.wait(timeout=60) != 0
        reached = max(steps())
        while max(steps()) < reached + 2:  # it trains on
            assert time.monotonic() < deadline and worker.is_running(), "the worker stopped with the server"
            time.sleep(0.3)
        events = [e["event"] for e in read_events(Path(folder), 0)[0]]
        assert "cancelled" not in events
        assert json.loads((Path(folder) / "status.json").read_text())["state"] == "running"
    finally:
        if server.poll() is None:
            server.kill()
        if worker is not None and worker.is_running():
            worker.kill()
            worker.wait(60)


def _two_channel_model(app, bundle: Path) -> str:
    """The two-channel (FLAIR, T1c) bundle loaded as a user loads a model folder; the server is not started, so the
    change listener is called as the page's choice would call it."""
    app.session.data_dir, app.state.model_folder = bundle.parent, bundle.name
    app.load_model_folder()
    app._on_model()
    return app.state.model_id


def _upload(app, path: Path, name: str, label: bool = False):
    """A file uploaded as a volume (or a label map of the volume under "…drawn on volume"); its node."""
    app.state.load_as = "label" if label else "volume"
    app.upload([{"name": name, "content": path.read_bytes()}])
    assert app.state.message_kind == "info", app.state.message
    return (app.session.segmentations() if label else app.session.volumes())[-1]


def _reference(segmentation):
    return segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())


def test_a_two_channel_model_adapts_on_cases_of_a_volume_per_channel_and_its_job_reopens_so(app, tmp_path, monkeypatch,
                                                                                             two_channel_bundle):
    """A BraTS-style model takes FLAIR and T1c per case (the panel said such a model needed the command line): each
    row and the volume to segment take a volume per channel, uploads fill the channels in the model's order, labels lie
    on the first channel, where the results come; re-adapt and the slices to check work on such cases, and the job
    reopens (a restarted server) with its rows' channels."""
    import asyncio

    from two_channel_model import brats_file, whole_tumour

    model = _two_channel_model(app, two_channel_bundle)
    assert app.state.channel_names == ["FLAIR", "T1c"] and "a volume per channel: FLAIR, T1c" in \
        app.state.model_description
    assert app.state.pairs == app.state.audit_pairs == [{"volume": None, "channels": [None], "segmentation": None}]
    flair, t1c = (_upload(app, brats_file(3, channel), f"pat3_{channel}.nii.gz") for channel in ("FLAIR", "T1c"))
    assert app.state.label_of == flair.GetID()  # the case's first channel, not the volume loaded last
    label = _upload(app, whole_tumour(3, tmp_path / "wt3.nii.gz"), "wt3.nii.gz", label=True)
    assert app.state.pairs == [{"volume": flair.GetID(), "channels": [t1c.GetID()], "segmentation": label.GetID()}]
    assert _reference(label) is flair
    app.remove_pair("audit_pairs", 0)
    target = _upload(app, brats_file(5, "FLAIR"), "pat5_FLAIR.nii.gz")
    assert app.state.targets == [target.GetID()] and app.state.target_channels == {target.GetID(): [None]}
    target_t1c = _upload(app, brats_file(5, "T1c"), "pat5_T1c.nii.gz")
    assert app.state.target_channels == {target.GetID(): [target_t1c.GetID()]}
    app.state.method = "lora"
    app._on_method("lora")
    app.state.update({"rank": 2, "budget_percent": "100", "steps": "2", "patch_size": "32", "device": "cpu",
                      "audit_every": "2"})
    asyncio.run(app.start())
    _follow_to_the_end(app)
    run = app.session.current.run
    assert run.state.outcome == "finished", run.state.describe()
    assert [len(case.images) for case in [*run.job.spec.support, *run.job.spec.predict]] == [2, 2]
    [result] = app.session.current.results
    assert _reference(result) is target and app.state.shown_volume == target.GetID()  # on the FLAIR volume

    app.next_slice()
    assert app.state.message.startswith(f"{target.GetName()}: slice "), app.state.message
    app.mark_slice_checked()
    assert app.state.message_kind == "info" and "marked as right" in app.state.message, app.state.message
    asyncio.run(app.readapt())
    _follow_to_the_end(app)
    second = app.session.current.run
    assert second.state.outcome == "finished", second.state.describe()
    assert [len(case.images) for case in second.job.spec.support] == [2, 2]  # the corrected case: both channels

    reopened = new_app(tmp_path / "restarted", monkeypatch)
    reopened.open_job_folder(run.jobDir)
    assert reopened.state.model_id == model and reopened.state.channel_names == ["FLAIR", "T1c"]
    [row] = reopened.state.pairs
    names = [reopened.session.node(i).GetName() for i in (row["volume"], *row["channels"])]
    assert names == ["pat3 FLAIR", "pat3 T1c"] and row["segmentation"]  # the case: what its files' names share
    [shown] = reopened.state.targets
    names = [reopened.session.node(i).GetName() for i in (shown, *reopened.state.target_channels[shown])]
    assert names == ["pat5 FLAIR", "pat5 T1c"] and reopened.state.shown_volume == shown
    [(case, _)] = reopened.request().trainingPairs
    assert [node.GetID() for node in case] == [row["volume"], *row["channels"]]


def test_a_missing_channel_is_refused_naming_it_and_rows_follow_the_model_s_channels(app, tmp_path, two_channel_bundle):
    """Start with a case short of a channel says which, in one line, before any job folder; a label loaded on a case's
    second channel is drawn on its first; choosing a model of another channel count adds or drops the rows' channel
    slots (a single-channel model's rows give a volume per case, as before); what the page sends is checked."""
    import asyncio

    from two_channel_model import brats_file, whole_tumour

    model = _two_channel_model(app, two_channel_bundle)
    flair = _upload(app, brats_file(3, "FLAIR"), "pat3_FLAIR.nii.gz")
    label = _upload(app, whole_tumour(3, tmp_path / "wt3.nii.gz"), "wt3.nii.gz", label=True)
    app.state.update({"steps": "2", "audit_every": "2"})
    asyncio.run(app.start())
    assert (app.state.message, app.state.message_kind) == ("training pair 1, T1c: a volume is needed", "error")
    assert not (app.session.work_dir / "jobs").exists() or not any((app.session.work_dir / "jobs").iterdir())

    t1c = _upload(app, brats_file(3, "T1c"), "pat3_T1c.nii.gz")
    app.state.label_of = t1c.GetID()  # "…drawn on volume": the T1c
    again = _upload(app, tmp_path / "wt3.nii.gz", "wt3.nii.gz", label=True)
    assert _reference(again) is flair and app.state.message.endswith("drawn on its case's first channel 'pat3_FLAIR'")
    assert app.request().trainingPairs == [((flair, t1c), label)]

    app.state.model_id = "deepbet-brain"
    app._on_model()
    assert app.state.channel_names == ["channel 1"] and app.state.pairs[0]["channels"] == []
    assert app.request().trainingPairs == [(flair, label)]
    app.state.model_id = model
    app._on_model()
    assert app.state.pairs[0] == {"volume": flair.GetID(), "channels": [None], "segmentation": label.GetID()}

    app.state.pairs = [{**app.state.pairs[0], "channels": "T1c"}]  # the page is not trusted
    assert app.request().trainingPairs == [((flair, None), label)]
    app.state.targets = [flair.GetID()]  # the page's multi-select, and its change listener
    app._fit_channels()
    assert app.state.target_channels == {flair.GetID(): [None]}
    app.set_target_channel(flair.GetID(), 0, t1c.GetID())  # the T1c select beside it
    assert app.request().targetVolumes == [(flair, t1c)]
    app.set_target_channel(flair.GetID(), 1, t1c.GetID())
    assert app.state.message == f"no channel 1 of a volume to segment '{flair.GetID()}'"
