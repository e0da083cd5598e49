"""The browser app end to end, as a person uses it: the real `peftadapt web` server in a subprocess, Debian's Chromium
driven by Playwright, a real BraTS case (deepbet, SEA-PEFT, 4 steps on 64³ patches), clicks and typing only.

Stages are screenshotted into out/web-e2e/ (ignored by git; `.ci/run` prints the folder). The response time of a
click while a job trains is written to out/web-e2e/latency.json (docs/benchmarks.md; not asserted).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import REPO, shared

SCREENSHOTS = REPO / "out" / "web-e2e"
CHROMIUM_ENV = "PEFTADAPT_CHROMIUM"
RUN_TIMEOUT_MS = 20 * 60 * 1000  # one adaptation round on 2 shared CPU cores, with room
CASES = {"train": "brats_2013_pat0003_1", "audit": "brats_2013_pat0004_1", "audit2": "brats_2013_pat0005_1",
         "target": "brats_2013_pat0006_1"}
IMAGE, MASK = "T1c_subtrMeanDivStd.nii.gz", "brainmask.nii.gz"


def chromium() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"no Chromium found: `apt-get install chromium` (README, 'In the browser') or set {CHROMIUM_ENV}")
    return path


class AppServer:
    """`peftadapt web` in a subprocess on a free loopback port; its output is kept for the failure report."""

    def __init__(self, work: Path, data: Path | None = None, host: str = "127.0.0.1"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "PEFTAdaptLib.cli", "web", "--host", host, "--port", str(port), "--work", str(work),
             *(["--data", str(data)] if data else [])], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.process.poll() is None:
            found = [re.search(r"in the browser: (\S+)", line) for line in list(self.output)]
            if any(found):
                self.url = next(m.group(1) for m in found if m)
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the app did not start:\n" + "".join(self.output[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


# -- how a person works the page ---------------------------------------------------------------------------------
def message(page) -> str:
    return page.locator("#message").inner_text() if page.locator("#message").is_visible() else ""


def wait_message(page, text: str, timeout: float = 120_000) -> str:
    page.wait_for_function("t => { const m = document.querySelector('#message'); return m && m.innerText.includes(t) }",
                           arg=text, timeout=timeout)
    return message(page)


def open_section(page, title: str) -> None:
    header = page.locator(".v-expansion-panel-title", has_text=title)
    if header.get_attribute("aria-expanded") != "true":
        header.click()


def choose(page, select: str, item: str) -> None:
    page.locator(select).locator("xpath=ancestor::div[contains(@class, 'v-field')][1]").click()
    page.locator(".v-overlay--active .v-list-item", has_text=item).first.click()
    page.keyboard.press("Escape")


def load_from_data_folder(page, relative: str, as_label: bool = False) -> None:
    page.click("#load-as-label" if as_label else "#load-as-volume")
    page.fill("#data-pick", relative)
    page.locator(".v-overlay--active .v-list-item", has_text=relative).first.click()
    page.click("#load-data")
    wait_message(page, f"loaded {relative}")


def selected(page, select: str) -> str:
    """What a Vuetify select shows (its id sits on the input inside)."""
    return page.locator(select).locator("xpath=ancestor::div[contains(@class, 'v-select')][1]").inner_text()


def upload(page, path: Path, as_label: bool = False) -> str:
    page.click("#load-as-label" if as_label else "#load-as-volume")
    page.set_input_files("#upload", str(path))
    return wait_message(page, path.name)


def run_text(page) -> str:
    return page.locator("#run-text").inner_text()


def wait_run_end(page) -> str:
    page.wait_for_function("() => /^(Finished|Failed|Cancelled)/.test(document.querySelector('#run-text').innerText)",
                           timeout=RUN_TIMEOUT_MS)
    return run_text(page)


def dice_traces(page) -> dict[str, int]:
    """Each curve of the Dice chart by its legend name, with the number of points drawn."""
    return page.evaluate("""() => {
        const names = [...document.querySelectorAll('#dice-chart .legend .traces .legendtext')].map(t => t.textContent);
        const traces = [...document.querySelectorAll('#dice-chart .scatterlayer .trace')];
        return Object.fromEntries(traces.map((t, i) => [names[i], t.querySelectorAll('.point').length]));
    }""")


def axial_view(page):
    return page.locator(".layout-grid-item").first  # Four-Up: axial first


def label_pixels(page, box=None) -> int:
    """Pixels of the axial view in the model's brain colour (brown: red over green over blue), in `box` (fractions
    x0, y0, x1, y1) or everywhere. The volume itself is greyscale."""
    image = np.asarray(Image.open(io.BytesIO(axial_view(page).screenshot())).convert("RGB")).astype(int)
    if box is not None:
        h, w = image.shape[:2]
        image = image[int(box[1] * h):int(box[3] * h), int(box[0] * w):int(box[2] * w)]
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((r - b > 25) & (r - g > 10)).sum())


def wait_for_pixels(page, enough, box=None, timeout: float = 60) -> int:
    """The views are images streamed from the server: wait until the axial one's label pixels are `enough`."""
    deadline = time.monotonic() + timeout
    while not enough(count := label_pixels(page, box)) and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    return count


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def click_latency_ms(page) -> float:
    """A click on 'Add pair' until its row is drawn: the server's answer while the worker trains."""
    return page.evaluate("""async () => {
        const rows = () => document.querySelectorAll('[id^=pair-][id$=-remove]').length;
        const before = rows(), start = performance.now();
        document.querySelector('#add-pair').click();
        await new Promise(done => { const check = () => rows() > before ? done() : requestAnimationFrame(check); check(); });
        return performance.now() - start;
    }""")


def on_the_panel(page, selector: str) -> dict:
    """The button's box, after checking that it lies on the panel and that the mouse reaches it there (no view
    covers it); a click by id would not notice either."""
    button = page.locator(selector)
    button.scroll_into_view_if_needed()  # up or down: the panel must not have scrolled sideways to show it
    assert page.evaluate("() => document.querySelector('.v-navigation-drawer__content').scrollLeft") == 0, selector
    box, panel = button.bounding_box(), page.locator(".v-navigation-drawer").bounding_box()
    assert panel["x"] <= box["x"] and box["x"] + box["width"] <= panel["x"] + panel["width"], (selector, box, panel)
    centre = [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2]
    assert page.evaluate("""([x, y, id]) => {
        const hit = document.elementFromPoint(x, y), button = document.getElementById(id);
        return button.disabled ? !!hit?.closest('.v-navigation-drawer') : hit?.closest('button') === button }""",
                         [*centre, selector[1:]]), selector  # a disabled button lets the pointer through to the panel
    return {"x": centre[0], "y": centre[1]}


def mouse_click(page, selector: str) -> None:
    centre = on_the_panel(page, selector)
    page.mouse.click(centre["x"], centre["y"])


def unnamed_buttons(page) -> list[str]:
    """The visible buttons a screen reader would announce as just 'button'."""
    return page.evaluate("""() => [...document.querySelectorAll('button')].filter(b => b.offsetParent !== null)
        .filter(b => !(b.getAttribute('aria-label') || b.getAttribute('title') || b.innerText).trim())
        .map(b => b.id || b.outerHTML.slice(0, 120))""")


def geometry(image: sitk.Image) -> tuple:
    return (image.GetSize(), *(tuple(np.round(values, 3).tolist())
                               for values in (image.GetSpacing(), image.GetOrigin(), image.GetDirection())))


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkFloat32), str(tmp_path / "slice2d.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((40, 90, 90), np.uint8)), str(tmp_path / "other_grid_label.nii.gz"))
    data = shared(f"brats/{CASES['target']}/{IMAGE}").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    return {name: tmp_path / f"{name}.nii.gz" for name in ("slice2d", "other_grid_label", "truncated")}


def test_adapt_correct_readapt_and_download_in_the_browser(browser, bad_files, tmp_path):
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    work, data = tmp_path / "work", shared("brats")
    server = AppServer(work, data)
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_selector("#start", timeout=60_000)

        # data in: the training volume from the data folder, then three bad uploads, each one line, none fatal
        load_from_data_folder(page, f"{CASES['train']}/{IMAGE}")
        for name, expected, as_label in (("slice2d", "is 3D: a volume", False),
                                         ("truncated", "truncated or corrupt", False),
                                         ("other_grid_label", "label must be drawn on the same grid", True)):
            text = upload(page, bad_files[name], as_label)
            assert expected in text and "\n" not in text.strip(), text
            assert "error" in page.locator("#message").get_attribute("class")
        shot(page, "01-bad-upload")
        load_from_data_folder(page, f"{CASES['train']}/{MASK}", as_label=True)  # the app kept working
        # audit pairs of two other subjects: with one, the panel says it vouches for that volume only
        load_from_data_folder(page, f"{CASES['audit']}/{IMAGE}")
        load_from_data_folder(page, f"{CASES['audit']}/{MASK}", as_label=True)
        assert "One audit volume vouches for itself only" in page.locator("#audit-advice").inner_text()
        page.click("#add-audit")
        for role in ("audit2", "target"):
            load_from_data_folder(page, f"{CASES[role]}/{IMAGE}")
            if role == "audit2":
                load_from_data_folder(page, f"{CASES[role]}/{MASK}", as_label=True)
        assert CASES["train"] in selected(page, "#pair-0-segmentation")
        assert CASES["audit"] in selected(page, "#audit-0-segmentation")
        assert CASES["audit2"] in selected(page, "#audit-1-segmentation")
        assert page.locator("#audit-advice").is_hidden()
        assert CASES["target"] in selected(page, "#targets")
        assert wait_for_pixels(page, lambda n: n < 50) < 50  # the target volume alone: greyscale

        # method and budget, a short run on small patches, Start
        choose(page, "#method", "sea-peft")
        for field, value in (("#budget", "1"), ("#steps", "4"), ("#patch-size", "64"), ("#audit-every", "2")):
            page.fill(field, value)
        page.click("#start")
        wait_message(page, "adaptation started")
        page.wait_for_function("() => document.querySelectorAll('#dice-chart .scatterlayer .trace .point').length >= 2",
                               timeout=RUN_TIMEOUT_MS)
        points, text = dice_traces(page).get("round 1", 0), run_text(page)
        assert points >= 2 and not text.startswith(("Finished", "Failed")), (points, text)
        shot(page, "02-training")
        open_section(page, "Jobs in the work folder")  # the panel follows one job: no other is opened meanwhile
        page.click("#refresh-jobs")
        page.wait_for_selector(".job-open")
        assert all(button.is_disabled() for button in page.locator(".job-open").all())

        # while it trains: clicks are answered, a second tab sees the same run, a reload loses nothing
        latencies = []
        for _ in range(8):
            latencies.append(click_latency_ms(page))
            page.locator("[id^=pair-][id$=-remove]").last.click()
            page.wait_for_function("() => document.querySelectorAll('[id^=pair-][id$=-remove]').length === 1")
        second = browser.new_page(viewport={"width": 1200, "height": 800})
        second.goto(server.url)
        second.wait_for_selector("#run-text")
        second.wait_for_function("() => document.querySelector('#run-text').innerText.length > 0")
        assert run_text(second).split(",")[0] == run_text(page).split(",")[0]
        page.reload()
        page.wait_for_selector("#start")
        page.wait_for_function("() => document.querySelectorAll('#dice-chart .scatterlayer .trace .point').length >= 2")
        assert page.locator("#start").is_disabled() or run_text(page).startswith("Finished")

        assert wait_run_end(page).startswith("Finished"), run_text(page)
        assert re.search(r"^audit Dice: start \d\.\d{4}, kept \d\.\d{4}", run_text(page), re.M), run_text(page)
        assert wait_for_pixels(page, lambda n: n > 2000) > 2000  # the result over the volume, in the model's colour
        shot(page, "03-result")

        # correct the result: paint a stroke outside the brain on the axial view
        open_section(page, "Correct (segment editor)")
        page.locator(".v-expansion-panel", has_text="Correct (segment editor)").locator(
            "button:has(.mdi-brush)").first.click()
        stroke = (0.15, 0.15, 0.35, 0.3)
        before = label_pixels(page, stroke)
        box = axial_view(page).bounding_box()
        x, y = box["x"] + 0.18 * box["width"], box["y"] + 0.2 * box["height"]
        page.mouse.move(x, y)
        page.mouse.down()
        for k in range(12):
            page.mouse.move(x + k * 0.012 * box["width"], y + k * 0.006 * box["height"])
            page.wait_for_timeout(40)
        page.mouse.up()
        painted = wait_for_pixels(page, lambda n: n > before + 300, stroke)
        assert painted > before + 300, (before, painted)
        shot(page, "04-corrected")

        # the ranked slice shown first is right as predicted: marked, the re-adapt trains on it as well
        mouse_click(page, "#next-slice")
        wait_message(page, "where the model is least sure")
        mouse_click(page, "#mark-checked")
        wait_message(page, "marked as right")

        # re-adapt with the correction; the server is restarted meanwhile: the job folder carries the run
        page.click("#readapt")
        wait_message(page, "round 2 started")
        page.wait_for_function("() => document.querySelector('#run-text').innerText.startsWith('Training')",
                               timeout=RUN_TIMEOUT_MS)  # its worker is up (holds the job folder)
        server.stop()
        server = AppServer(work, data)
        page.goto(server.url)
        page.wait_for_selector("#start")
        page.wait_for_function("() => /^round 2/.test(document.querySelector('#phase').innerText)", timeout=60_000)
        assert wait_run_end(page).startswith("Finished"), run_text(page)
        assert wait_for_pixels(page, lambda n: n > 2000) > 2000
        traces = dice_traces(page)
        assert traces.get("round 1", 0) >= 2 and traces.get("round 2", 0) >= 2 and "zero-shot" in traces, traces
        assert page.locator("#units tbody tr").count() > 0  # the allocation view lists the units chosen
        shot(page, "05-round-2")

        # downloads: NIfTI and .seg.nrrd on the input's grid, the adapter as a zip
        open_section(page, "Downloads")
        reference = sitk.ReadImage(str(data / CASES["target"] / IMAGE))
        for button in ("#download-nii-gz", "#download-seg-nrrd"):
            with page.expect_download() as download:
                page.click(button)
            path = tmp_path / download.value.suggested_filename
            download.value.save_as(path)
            segmentation = sitk.ReadImage(str(path))
            assert geometry(segmentation) == geometry(reference), path.name
            values = np.unique(sitk.GetArrayFromImage(segmentation))
            assert set(values) == {0, 1}, (path.name, values)
        with page.expect_download() as download:
            page.click("#download-adapter")
        names = zipfile.ZipFile(download.value.path()).namelist()
        assert {"adapter/adapter.json", "adapter/adapter.safetensors"} <= set(names)

        # the correction went into round 2's training cases: more brain than round 1 predicted
        rounds = sorted((work / "jobs").glob("job-*"))
        for job in rounds:  # both rounds audited on both audit pairs
            audit = json.loads((job / "job.json").read_text())["audit"]
            assert [case["name"].split("/")[0] for case in audit] == [CASES["audit"], CASES["audit2"]], audit
        first = sitk.GetArrayFromImage(sitk.ReadImage(str(next((rounds[0] / "predictions").iterdir()))))
        corrected = sitk.GetArrayFromImage(sitk.ReadImage(str(rounds[1] / "inputs" / "support1_label.nrrd")))
        assert corrected.sum() > first.sum() + 100
        warm_start = rounds[1] / json.loads((rounds[1] / "job.json").read_text())["warm_start"]
        assert (warm_start / "adapter.safetensors").read_bytes() == \
            (rounds[0] / "adapter" / "adapter.safetensors").read_bytes()  # round 2 continued from round 1

        # the demo data in one click fills the panel
        page.click("#demo")
        wait_message(page, "demo data loaded", 300_000)
        assert "demo/support_t2like" in selected(page, "#pair-0-volume")
        shot(page, "06-demo")

        (SCREENSHOTS / "latency.json").write_text(json.dumps(
            {"clicks": len(latencies), "median_ms": statistics.median(latencies), "max_ms": max(latencies),
             "all_ms": [round(v, 1) for v in latencies]}, indent=2))
        print(f"\nbrowser screenshots: {SCREENSHOTS}; click while training: median "
              f"{statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms")
    except Exception:
        print("".join(server.output[-60:]))
        raise
    finally:
        server.stop()


def test_the_panel_s_buttons_are_on_it_named_and_every_message_shows(browser, tmp_path, monkeypatch):
    """Found by a user-level check: at 1600 px the run row ran off the panel behind the views (the correction buttons
    could not be clicked), icon-only buttons had no name, a closed message line stayed closed for every later
    message, and the run text lost its line breaks. A model folder's model that cannot be offered is said under the
    model choice."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "registry.json").write_text("[]")
    monkeypatch.setenv("PEFTADAPT_MODELS", str(tmp_path / "models"))
    server = AppServer(tmp_path / "work")
    try:
        for width, height in ((1600, 1000), (700, 900)):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(server.url)
            page.wait_for_selector("#start", timeout=60_000)
            for button in ("#start", "#cancel", "#readapt", "#next-slice", "#mark-checked"):
                on_the_panel(page, button)
            for title in ("Model", "Correct (segment editor)", "Downloads", "Jobs in the work folder"):
                open_section(page, title)
            page.wait_for_timeout(500)
            assert unnamed_buttons(page) == []
        assert page.evaluate("() => getComputedStyle(document.querySelector('#run-text')).whiteSpace") == "pre-line"
        unlisted = page.locator("#unlisted-models")
        assert unlisted.is_visible() and unlisted.inner_text().splitlines() == [
            "Not offered from the model folder:", f"{tmp_path / 'models' / 'registry.json'}: holds no registry entry "
            "(an empty list); describe the model or delete the file"]

        page.fill("#steps", "0")
        mouse_click(page, "#start")
        assert "steps: '0'" in wait_message(page, "steps: '0'")
        page.locator("#message button").click()  # the message line's close button
        page.wait_for_selector("#message", state="hidden")
        page.fill("#steps", "-5")
        mouse_click(page, "#start")
        assert "steps: '-5'" in wait_message(page, "steps: '-5'") and page.locator("#message").is_visible()
        page.fill("#steps", "4")
        page.fill("#budget", "1000")
        mouse_click(page, "#start")
        wait_message(page, "budget: '1000' % must be at most 100 %")
        assert not (tmp_path / "work" / "jobs").exists() or not any((tmp_path / "work" / "jobs").iterdir())
    except Exception:
        print("".join(server.output[-60:]))
        raise
    finally:
        server.stop()


def field_label(page, select: str) -> str:
    """A Vuetify field's label (Vuetify gives it the field's id, "-label" added)."""
    return page.locator(f"{select}-label").text_content().strip()


def input_classes(page, select: str) -> str:
    """The classes of a Vuetify field's root (`v-input--error` while it shows an error)."""
    return page.locator(select).locator(
        "xpath=ancestor::div[contains(concat(' ', @class, ' '), ' v-input ')][1]").get_attribute("class")


def test_a_two_channel_model_s_rows_take_a_volume_per_channel(browser, tmp_path, two_channel_bundle):
    """A BraTS-style model (FLAIR, T1c) loaded from the data folder: each row, and each volume to segment, gets a
    select per channel, named by it and filled in the model's order as the volumes load; a channel left empty in a row
    that has another shows, and Start names it (no job starts). The single-channel model's rows had no such select."""
    from two_channel_model import brats_file, whole_tumour

    data = tmp_path / "data"
    shutil.copytree(two_channel_bundle, data / "brats-model")
    for patient in (3, 5):
        (data / f"pat{patient}").mkdir()
        for channel in ("FLAIR", "T1c"):
            shutil.copy(brats_file(patient, channel), data / f"pat{patient}" / f"{channel}.nii.gz")
    whole_tumour(3, data / "pat3" / "tumour.nii.gz")
    server = AppServer(tmp_path / "work", data)
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_selector("#start", timeout=60_000)
        assert field_label(page, "#pair-0-volume") == "Volume 1" and field_label(page, "#targets") == \
            "Segment after adapting"
        assert page.locator("[id^=pair-0-channel-]").count() == 0
        open_section(page, "Model")
        page.fill("#model-folder", "brats-model")
        page.click("#load-model-folder")
        wait_message(page, "loaded from brats-model")
        page.wait_for_selector("#pair-0-channel-1")
        for name in ("FLAIR", "T1c"):
            load_from_data_folder(page, f"pat3/{name}.nii.gz")
        load_from_data_folder(page, "pat3/tumour.nii.gz", as_label=True)
        for select, label, volume in (("#pair-0-volume", "Volume 1 (FLAIR)", "pat3/FLAIR"),
                                      ("#pair-0-channel-1", "Volume 1 (T1c)", "pat3/T1c"),
                                      ("#pair-0-segmentation", "Segmentation 1", "pat3/tumour")):
            assert field_label(page, select) == label and volume in selected(page, select), selected(page, select)
        for select in ("#pair-0-channel-1", "#audit-0-volume", "#audit-0-channel-1"):  # filled; an empty row
            assert "v-input--error" not in input_classes(page, select), select
        choose(page, "#audit-0-channel-1", "pat3/T1c")  # a row's T1c without its FLAIR: the FLAIR shows the error
        page.wait_for_function("() => document.querySelector('#audit-0-volume')"
                               ".closest('.v-input').classList.contains('v-input--error')")
        page.click("#audit-0-remove")
        load_from_data_folder(page, "pat5/FLAIR.nii.gz")
        assert "pat5/FLAIR" in selected(page, "#targets")
        assert field_label(page, "#targets") == "Segment after adapting (FLAIR)"
        assert field_label(page, "#target-0-channel-1") == "T1c for pat5/FLAIR"
        assert "v-input--error" in input_classes(page, "#target-0-channel-1")
        page.click("#start")
        assert "\n" not in wait_message(page, "volume to segment, T1c: a volume is needed").strip()
        assert not (tmp_path / "work" / "jobs").exists() or not any((tmp_path / "work" / "jobs").iterdir())
        load_from_data_folder(page, "pat5/T1c.nii.gz")
        page.wait_for_function("() => !document.querySelector('#target-0-channel-1')"
                               ".closest('.v-input').classList.contains('v-input--error')")
        assert "pat5/T1c" in selected(page, "#target-0-channel-1")
    except Exception:
        print("".join(server.output[-60:]))
        raise
    finally:
        server.stop()
