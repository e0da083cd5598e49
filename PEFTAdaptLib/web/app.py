"""`peftadapt web`: the PEFTAdapt panel in the browser, on a real MRML scene rendered server-side by trame-slicer.

The server owns one scene and one `PanelSession`; every browser tab connected to it shows the same state (trame
shares it), and a reloaded tab finds it unchanged. Jobs run in the background worker (another process) and are
followed by an asyncio task, so the server answers clicks while they train. A job's state comes from its folder:
a restarted server picks a running job up again (`PanelSession.open_job`).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
from functools import wraps
from pathlib import Path

from trame.app import get_server
from trame_server.utils.asynchronous import create_task
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import SegmentEditorLogic
from trame_slicer.app.ui import SegmentEditorUI, create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from ..errors import InputError, PEFTAdaptError
from ..jobs.files import refuse_linked_folder
from ..jobs.spec import DEVICES
from ..methods import DEFAULT_METHOD, method_class, method_names
from ..mrml.logic import AdaptationRequest, audit_advice, channels_of, reference_of
from ..mrml.scene_io import SceneError
from . import access, charts, panel
from .session import JOBS, PanelSession, write_demo_files

POLL_SECONDS = 0.5
#: the panel's lists of {"volume", "channels", "segmentation"} node ids: training pairs, then audit pairs. "volume" is
#: a case's first image channel (its only one for most models), "channels" the model's others (T1c after FLAIR…)
PAIR_LISTS = ("pairs", "audit_pairs")
log = logging.getLogger("peftadapt.web")


def reports_errors(handler):
    """A control's failure becomes the panel's one-line message; the app goes on."""

    def report(self, exc: Exception) -> None:
        if isinstance(exc, (PEFTAdaptError, SceneError)):
            self.say(str(exc), "error")
        else:  # the server must survive any one click
            log.error("control %s failed", handler.__name__, exc_info=exc)
            self.say(f"internal error: {type(exc).__name__}: {exc}", "error")

    if asyncio.iscoroutinefunction(handler):
        @wraps(handler)
        async def run_async(self, *args, **kwargs):
            try:
                return await handler(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported above
                report(self, exc)
            finally:
                self.state.busy = False
                self.state.flush()
            return None

        return run_async

    @wraps(handler)
    def run(self, *args, **kwargs):
        try:
            return handler(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported above
            report(self, exc)
        return None

    return run


def _pair_list(key: str) -> str:
    """A pair list named by a click of the page (the page is not trusted to name state keys)."""
    if key not in PAIR_LISTS:
        raise InputError(f"no pair list '{key}'")
    return key


def _ids(value, count: int) -> list:
    """`count` node ids from a list the page sent (not trusted): anything but an id is an empty slot."""
    given = value[:count] if isinstance(value, list) else []
    return [item if isinstance(item, str) and item else None for item in given] + [None] * (count - len(given))


def four_up() -> Layout:
    """Slicer's Four-Up layout: axial and 3D above, coronal and sagittal below."""
    row = lambda *views: Layout(LayoutDirection.Horizontal, list(views))  # noqa: E731
    return Layout(LayoutDirection.Vertical, [
        row(ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view()),
        row(ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view())])


def _image_below_segmentations(slice_view) -> None:
    """trame-slicer 2.0 adds a slice view's image actor when the view first shows a volume; the actors of a
    segmentation added to the scene before then come first, and wherever that segmentation shows, the slice shows only
    its fill over black (a job opened into an empty scene). Adding the (still empty) image actor now keeps Slicer's
    order: the image first, segmentations over it."""
    slice_view._render_manager.SetImageDataConnection(None)


def _positive(value, field: str, whole: bool = True) -> int | float:
    """A number typed in a field: refused with the field's name unless it is (whole and) greater than 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0 or (whole and not number.is_integer()):
        raise InputError(f"{field}: '{value}' is not a {'whole ' if whole else ''}number greater than 0")
    return int(number) if whole else number


def _percent(value, field: str) -> float:
    """A share typed in percent: refused in the field's own unit above 100 % (the engine's fraction is not shown)."""
    number = _positive(value, field, whole=False)
    if number > 100:
        raise InputError(f"{field}: '{value}' % must be at most 100 %")
    return number


class WebApp:
    def __init__(self, server, work_dir: Path, data_dir: Path | None = None):
        self.server, self.state = server, server.state
        server.enable_module(trame_slicer_module)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, server,
                               panel.named_by_their_tooltips(create_vertical_slice_view_gutter_ui),
                               panel.named_by_their_tooltips(create_vertical_view_gutter_ui))
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
        self.layout_manager.register_layout("Four-Up", four_up())
        self.layout_manager.set_layout("Four-Up")
        for view in self.slicer.view_manager.get_slice_views():
            view.set_visible_in_3d(True)  # the 3D view shows the three slices, as Slicer's does with the eye on
            _image_below_segmentations(view)
        self.session = PanelSession(self.slicer.scene, work_dir, data_dir)
        self.uploaded_maps: dict[str, Path] = {}  # label maps uploaded, by the name the list shows
        self._editor_logic = SegmentEditorLogic(server, self.slicer)

        cards = self.session.logic.modelCards()
        data_files, label_maps = access.data_files(Path(data_dir)) if data_dir else ([], [])
        state = self.state
        state.update({
            "trame__title": "PEFTAdapt", "busy": False, "message": "", "message_kind": "info",
            "models": [{"title": c.get("title") or c["id"], "value": c["id"]} for c in cards],
            "model_id": cards[0]["id"] if cards else None, "unlisted_models": self.session.logic.unlistedModels(),
            "methods": [{"title": f"{n} — {method_class(n).label}", "value": n} for n in method_names()],
            "method": DEFAULT_METHOD, "devices": list(DEVICES),
            **{key: [{"volume": None, "channels": [], "segmentation": None}] for key in PAIR_LISTS},
            "audit_advice": audit_advice(0), "channel_names": [], "target_channels": {},
            "has_data_folder": data_dir is not None,
            "data_files": data_files, "label_maps": label_maps, "label_map": None,
            "dice_chart": charts.dice_figure([]), "allocation_chart": charts.allocation([])[0], "units": [],
            "run_phase": "", "run_text": "", "run_progress": 0, "running": False, "can_readapt": False,
            "has_adapter": False, "trainable_text": "", "allocation_text": "", "jobs": [],
        })
        state.change("method")(self._on_method)
        state.change("model_id", "budget_percent")(self._on_model)
        state.change("shown_volume")(self._on_shown_volume)
        state.change("edit_segmentation")(self._on_edit_segmentation)
        state.change("audit_pairs")(self._on_audit_pairs)
        state.change("targets")(self._fit_channels)
        self._on_method(state.method)
        self._on_model()
        self._publish_nodes()
        self.refresh_jobs_now()
        self.ui = panel.build(self, self.layout_manager)
        server.controller.on_server_ready.add(self._on_ready)

    # -- widgets built here because they need the app's objects -----------------------------------------------------
    def editor_ui(self):
        ui = SegmentEditorUI()
        self._editor_logic.set_ui(ui)
        return ui

    # -- messages --------------------------------------------------------------------------------------------------
    def say(self, text: str, kind: str = "info") -> None:
        self.state.message = text.strip().splitlines()[0] if text.strip() else ""
        self.state.message_kind = kind

    # -- state → panel ---------------------------------------------------------------------------------------------
    def _publish_nodes(self) -> None:
        self.state.volumes = [{"title": n.GetName(), "value": n.GetID()} for n in self.session.volumes()]
        self.state.segmentations = [{"title": n.GetName(), "value": n.GetID()} for n in self.session.segmentations()]

    def _publish_run(self) -> None:
        state, rounds = self.state, self.session.rounds
        current = self.session.current
        runs = [r.run for r in rounds]
        state.dice_chart = charts.dice_figure(runs)
        state.allocation_chart, state.units = charts.allocation(runs)
        if current is None:
            return
        run_state = current.run.state
        state.running = self.session.running
        state.run_phase = f"round {len(rounds)}: {run_state.phase}"
        state.run_text = "\n".join(filter(None, (run_state.describe(), run_state.dice_text, run_state.class_text)))
        state.run_progress = 100 * run_state.step / run_state.steps if run_state.steps else 0
        state.trainable_text = run_state.trainable_text if run_state.trainable else ""  # SEA-PEFT: units decide
        state.allocation_text = run_state.allocation_summary
        state.can_readapt = bool(current.imported and current.results)
        state.has_adapter = (current.run.adapterFolder / "adapter.json").is_file()

    def _show_results(self) -> None:
        current = self.session.current
        if current is None or not current.results:
            return
        self._publish_nodes()
        result, volume_id = current.results[0], reference_of(current.run.volumes[0]).GetID()
        self.state.edit_segmentation = self.state.download_segmentation = result.GetID()
        if self.state.shown_volume == volume_id:
            self._on_shown_volume(volume_id)  # the same volume, a new segmentation over it
        self.state.shown_volume = volume_id

    @reports_errors
    def _on_method(self, method, **_) -> None:
        cls = method_class(method)
        self.state.method_takes_budget = cls.takes_budget
        # as in Slicer: the rank is the budget's unless the user picks one (a rank beside the budget must fit it)
        chosen = "Automatic (from the budget)" if cls.takes_budget else f"Default ({cls.default_rank})"
        self.state.method_ranks = [{"title": chosen, "value": 0}, *({"title": str(rank), "value": rank}
                                                                     for rank in cls.ranks)] if cls.ranks else []
        self.state.rank = 0

    @reports_errors
    def _on_model(self, **_) -> None:
        model_id = self.state.model_id
        if not model_id:
            return
        card = self.session.logic.card(model_id)
        labels = ", ".join(label["name"] for label in card["labels"] if int(label["value"]) != 0)
        names = self.session.logic.channelNames(model_id)
        channels = f"; a volume per channel: {', '.join(names)}" if len(names) > 1 else ""
        self.state.model_description = (f"{card.get('modality', '')}{channels}; labels: {labels}; "
                                        f"license {card.get('license', '')}")
        self.state.channel_names = names
        self._fit_channels()
        try:
            percent = float(self.state.budget_percent or 0)
        except (TypeError, ValueError):
            percent = 0
        count = self.session.logic.budgetParameters(model_id, percent) if percent > 0 else None
        self.state.budget_text = f"= {count:,} trainable parameters" if count else ""

    def _channel_count(self) -> int:
        """The image channels a case of the chosen model takes (1 for most models)."""
        return len(self.session.logic.channelNames(self.state.model_id)) if self.state.model_id else 1

    def _target_channels(self) -> dict:
        """Each volume to segment's other channels, by its first channel's id (a dict, whatever the page sent)."""
        given = self.state.target_channels
        return given if isinstance(given, dict) else {}

    @reports_errors
    def _fit_channels(self, **_) -> None:
        """Every row, and every volume to segment, gets a slot per channel of the model: a model of another channel
        count makes them appear empty or go."""
        extra = self._channel_count() - 1
        for key in PAIR_LISTS:
            self.state[key] = [{**pair, "channels": _ids(pair.get("channels"), extra)} for pair in self.state[key]]
        given = self._target_channels()
        self.state.target_channels = {target: _ids(given.get(target), extra) for target in self.state.targets or []
                                      if isinstance(target, str)}

    def _row(self, volumes: list | tuple = (), segmentation: str | None = None) -> dict:
        """A pair row of volume ids, one per channel of the model (the first in "volume"), and a segmentation id."""
        ids = _ids(list(volumes), self._channel_count())
        return {"volume": ids[0], "channels": ids[1:], "segmentation": segmentation}

    def _case(self, volume_id, channel_ids):
        """A case's volume node, or a tuple of them, one per channel of the model (a slot left empty is None: the
        logic names the missing channel)."""
        extra, node = self._channel_count() - 1, self.session.node
        if not extra:
            return node(volume_id)
        return (node(volume_id), *(node(i) for i in _ids(channel_ids, extra)))

    def _first_channel(self, volume_id):
        """The first channel of the case a volume is another channel of (its labels are drawn there), else itself."""
        extra = self._channel_count() - 1
        if not volume_id or not extra:
            return volume_id
        for key in PAIR_LISTS:
            for pair in self.state[key]:
                if pair.get("volume") and volume_id in _ids(pair.get("channels"), extra):
                    return pair["volume"]
        return next((target for target, channels in self._target_channels().items()
                     if volume_id in _ids(channels, extra)), volume_id)

    def _on_audit_pairs(self, audit_pairs, **_) -> None:
        self.state.audit_advice = audit_advice(sum(1 for pair in audit_pairs if pair.get("volume")))

    @reports_errors
    def _on_shown_volume(self, shown_volume, **_) -> None:
        volume = self.session.node(shown_volume)
        if volume is None:
            return
        self.slicer.display_manager.show_volume_in_slice_background(volume)
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        earlier = {node.GetID() for done in self.session.rounds[:-1] for node in done.results}  # superseded
        for segmentation in self.session.segmentations():
            reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
            segmentation.SetDisplayVisibility(reference is volume and segmentation.GetID() not in earlier)
        self.slicer.display_manager.reset_views()

    @reports_errors
    def _on_edit_segmentation(self, edit_segmentation, **_) -> None:
        segmentation = self.session.node(edit_segmentation)
        if segmentation is None:
            return
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if volume is None:
            self.say(f"segmentation '{segmentation.GetName()}' has no volume to be edited on", "error")
            return
        self.slicer.segmentation_editor.set_active_segmentation(segmentation, volume)
        if self.state.shown_volume != volume.GetID():
            self.state.shown_volume = volume.GetID()

    # -- data in ---------------------------------------------------------------------------------------------------
    def _load(self, path: Path, shown_as: str) -> None:
        """A file as a volume, or as a label map of the chosen volume (drawn on its case's first channel); the new
        node fills the first empty slot."""
        state = self.state
        mapped = ""
        if state.load_as == "label":
            volume = self.session.node(self._first_channel(state.label_of))
            node = self.session.load_label(path, volume, state.model_id, shown_as, self._label_map())
            self._place_segmentation(volume.GetID(), node.GetID())
            if volume.GetID() != state.label_of:
                mapped = f", drawn on its case's first channel '{volume.GetName()}'"
            mapped += f", its labels mapped onto the model's classes by {state.label_map}" if state.label_map else ""
        else:
            node = self.session.load_volume(path, state.model_id, shown_as)
            state.label_of = self._place_volume(node.GetID())
            state.shown_volume = node.GetID()
        self._publish_nodes()
        self.say(f"loaded {shown_as} as '{node.GetName()}'{mapped}")

    def _label_map(self) -> tuple[Path, str] | None:
        """The label map chosen for the next label files (uploaded, or a file of the data folder) and its name."""
        name = self.state.label_map
        if not name:
            return None
        if name in self.uploaded_maps:
            return self.uploaded_maps[name], name
        if self.session.data_dir is None:
            raise InputError(f"{name}: no such label map; upload it again")
        return access.inside(self.session.data_dir, name), name

    def _place_volume(self, volume_id: str) -> str:
        """Volumes fill the panel in the order a user brings them: the empty slots of the training and audit pairs
        (a slot per channel of the model, in its order: FLAIR, then T1c…), then the volume to segment (each can be
        changed afterwards; "Add pair" makes room for more). Returns the first channel of the case it joined."""
        state, extra = self.state, self._channel_count() - 1
        for key in PAIR_LISTS:
            for index, pair in enumerate(state[key]):
                slots = [pair.get("volume"), *_ids(pair.get("channels"), extra)]
                empty = next((position for position, slot in enumerate(slots) if not slot), None)
                if empty is not None:
                    slots[empty] = volume_id
                    state[key] = [*state[key][:index], {**pair, "volume": slots[0], "channels": slots[1:]},
                                  *state[key][index + 1:]]
                    return slots[0]
        channels = self._target_channels()
        for target in state.targets or []:
            slots = _ids(channels.get(target), extra)
            if None in slots:
                slots[slots.index(None)] = volume_id
                state.target_channels = {**channels, target: slots}
                return target
        if not state.targets:
            state.targets, state.target_channels = [volume_id], {volume_id: [None] * extra}
        return volume_id

    def _place_segmentation(self, volume_id: str, segmentation_id: str) -> None:
        for key in PAIR_LISTS:
            pairs = [dict(p) for p in self.state[key]]
            for pair in pairs:
                if pair["volume"] == volume_id and not pair["segmentation"]:
                    pair["segmentation"] = segmentation_id
                    self.state[key] = pairs
                    return

    @reports_errors
    def load_from_data(self) -> None:
        if self.session.data_dir is None or not self.state.data_pick:
            raise InputError("pick a file of the data folder first")
        path = access.inside(self.session.data_dir, self.state.data_pick)
        self._load(path, self.state.data_pick)
        self.state.data_pick = None

    @reports_errors
    def upload(self, files) -> None:
        for item in files or []:
            path = self.session.upload(item.get("name", ""), item.get("content") or b"")
            name = access.upload_name(item.get("name", ""))
            if access.is_label_map(name):  # chosen for the label files loaded next
                name = f"uploaded {name}"
                self.uploaded_maps[name] = path
                self.state.label_maps = [n for n in self.state.label_maps if n != name] + [name]
                self.state.label_map, self.state.load_as = name, "label"
                self.say(f"{name}: label files loaded next are mapped by it onto the model's classes")
            else:
                self._load(path, name)

    @reports_errors
    async def load_demo(self) -> None:
        self.state.busy = True
        self.say("writing the demo volumes (nilearn's MNI152 template, T2-like shift)…")
        self.state.flush()
        paths = await asyncio.to_thread(write_demo_files, self.session.work_dir)
        nodes = {}
        for role, (image, label) in paths.items():
            volume = self.session.load_volume(image, self.state.model_id, f"demo/{image.name}")
            nodes[role] = (volume, self.session.load_label(label, volume, self.state.model_id, f"demo/{label.name}"))
        ids = {role: (v.GetID(), s.GetID()) for role, (v, s) in nodes.items()}
        for key, role in zip(PAIR_LISTS, ("support", "audit")):
            self.state[key] = [self._row([ids[role][0]], ids[role][1])]
        self.state.targets = [ids["test"][0]]
        self._fit_channels()
        self.state.shown_volume = ids["test"][0]
        self._publish_nodes()
        self.say("demo data loaded: one training pair, the audit pair and a test volume to segment")

    @reports_errors
    def load_model_folder(self) -> None:
        if self.session.data_dir is None:
            raise InputError("start the server with --data DIR to load model folders from it")
        folder = access.inside(self.session.data_dir, self.state.model_folder or "", "model folder")
        card = self.session.logic.registerModelFolder(str(folder))
        others = [entry for entry in self.state.models if entry["value"] != card["id"]]  # loaded again: one entry
        self.state.models = others + [{"title": card.get("title") or card["id"], "value": card["id"]}]
        self.state.model_id = card["id"]
        self.say(f"model '{card['id']}' loaded from {self.state.model_folder}")

    @reports_errors
    def add_pair(self, key: str) -> None:
        key = _pair_list(key)
        self.state[key] = self.state[key] + [self._row()]

    @reports_errors
    def remove_pair(self, key: str, index: int) -> None:
        key = _pair_list(key)
        self.state[key] = [p for i, p in enumerate(self.state[key]) if i != index]

    @reports_errors
    def set_target_channel(self, target: str, index: int, volume_id: str | None) -> None:
        """A volume to segment's other channel (T1c…), chosen beside it in the page (which names no state key)."""
        channels = self._target_channels()
        slots = channels.get(target) if isinstance(target, str) else None
        if not isinstance(slots, list) or not isinstance(index, int) or not 0 <= index < len(slots):
            raise InputError(f"no channel {index} of a volume to segment '{target}'")
        slots = list(slots)
        slots[index] = volume_id if isinstance(volume_id, str) and volume_id else None
        self.state.target_channels = {**channels, target: slots}

    # -- runs ------------------------------------------------------------------------------------------------------
    def request(self) -> AdaptationRequest:
        state = self.state
        if not state.model_id:
            raise InputError("choose a foundation model")
        return AdaptationRequest(
            modelId=state.model_id,
            trainingPairs=self._pairs("pairs"), auditPairs=self._pairs("audit_pairs"),
            method=state.method,
            budgetPercent=_percent(state.budget_percent, "budget") if state.method_takes_budget else None,
            rank=int(state.rank) if state.method_ranks and state.rank else None,
            steps=_positive(state.steps, "steps"),
            patchSize=_positive(state.patch_size, "patch size") if str(state.patch_size or "").strip() else None,
            device=state.device,
            targetVolumes=[self._case(t, self._target_channels().get(t)) for t in state.targets or []],
            auditEvery=_positive(state.audit_every, "audit every"),
        )

    def _pairs(self, key: str) -> list:
        """A pair list's (volume, or a volume per channel, segmentation) nodes; a row left empty is no pair (a
        half-filled one is refused when the job is built)."""
        extra = self._channel_count() - 1
        filled = [p for p in self.state[key]
                  if p.get("volume") or p.get("segmentation") or any(_ids(p.get("channels"), extra))]
        return [(self._case(p.get("volume"), p.get("channels")), self.session.node(p.get("segmentation")))
                for p in filled]

    async def _starting(self, text: str) -> None:
        """Show that a start is under way before the nodes are exported (a second or two)."""
        self.state.busy = True
        self.say(text)
        self.state.flush()
        await asyncio.sleep(0.05)

    @reports_errors
    async def start(self) -> None:
        request = self.request()
        await self._starting("exporting the nodes and starting the worker…")
        self.session.start(request)
        self._publish_run()
        self.say(f"adaptation started in {self.session.current.run.jobDir}")

    @reports_errors
    async def readapt(self) -> None:
        await self._starting("re-adapting with the corrected segmentation added to the training pairs…")
        self.session.readapt()
        self._publish_run()
        self.say(f"round {len(self.session.rounds)} started: warm start, same audit pairs")

    @reports_errors
    def next_slice(self) -> None:
        """Move the views to the next slice where a correction is expected to help most (uncertainty ranking)."""
        found = self.session.next_slice()
        if found is None:
            self.say("every ranked slice was shown")
            return
        why = "where the model is least sure" if found.reason == "uncertain" else \
            "far from every slice checked so far (a confident miss shows no uncertainty)"
        self.say(f"{found.volume.GetName()}: slice {found.index} (axial), {why} — correct it, then Re-adapt")

    @reports_errors
    def mark_slice_checked(self) -> None:
        shown = self.session.mark_slice_checked()
        self.say(f"{shown.volume.GetName()}: slice {shown.index} marked as right — Re-adapt trains on it too")

    @reports_errors
    def cancel(self) -> None:
        self.session.cancel()
        self.say("cancelling: the worker keeps its last checkpoint and the best adapter so far")

    def _on_ready(self, **_) -> None:
        create_task(self._follow())

    async def _follow(self) -> None:
        """Poll the running job between clicks (file reads only: the worker is another process)."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.session.running:
                with self.state:
                    self.follow_once()

    def follow_once(self) -> None:
        """One poll of the running round into the panel; a run that failed says why in the message line (it said
        "adaptation started" until then)."""
        try:
            changed = self.session.poll()
        except Exception as exc:  # noqa: BLE001 - a bad event must not stop the polling
            log.exception("polling failed")
            self.say(f"following the job failed: {exc}", "error")
            self.session.current.imported = True
            changed = True
        if not changed:
            return
        self._publish_run()
        if not self.session.running:
            run_state = self.session.current.run.state
            if run_state.outcome == "failed":
                self.say(run_state.describe(), "error")
            self._show_results()
            self.refresh_jobs_now()

    # -- jobs of the work folder -----------------------------------------------------------------------------------
    def refresh_jobs_now(self) -> None:
        self.state.jobs = [{"name": info.folder.name, "method": info.method, "state": info.state,
                            "dice": info.dice_text, "message": info.message, "resumable": info.resumable}
                           for info in self.session.logic.adaptationJobs()]

    @reports_errors
    def refresh_jobs(self) -> None:
        self.refresh_jobs_now()

    def _job_folder(self, name: str) -> Path:
        """A job folder of the work folder named by the page: a link is refused before anything follows it."""
        refuse_linked_folder(self.session.work_dir / JOBS / name)
        return access.inside(self.session.work_dir / JOBS, name, "job folder")

    @reports_errors
    async def open_job(self, name: str) -> None:
        await self._starting(f"opening {name}…")
        self.open_job_folder(self._job_folder(name))

    @reports_errors
    async def resume_job(self, name: str) -> None:
        await self._starting(f"resuming {name} from its last checkpoint…")
        self.open_job_folder(self._job_folder(name), resume=True)

    def open_job_folder(self, folder: Path, resume: bool = False) -> None:
        """A job of the work folder back in the panel; `resume` restarts an interrupted, cancelled or failed one."""
        request = self.session.open_job(folder, resume)
        state = self.state
        state.model_id = request.modelId
        for key, pairs in zip(PAIR_LISTS, (request.trainingPairs, request.auditPairs)):
            state[key] = [self._row([n.GetID() for n in channels_of(v)], s.GetID()) for v, s in pairs]
        state.targets = [reference_of(v).GetID() for v in request.targetVolumes]
        state.target_channels = {reference_of(v).GetID(): [n.GetID() for n in channels_of(v)[1:]]
                                 for v in request.targetVolumes}
        state.method = request.method
        self._on_method(request.method)
        state.budget_percent = f"{request.budgetPercent:g}" if request.budgetPercent else state.budget_percent
        state.rank = request.rank or state.rank
        state.steps, state.device = str(request.steps), request.device
        state.patch_size = str(request.patchSize or "")
        state.audit_every = str(request.auditEvery)
        self._on_model()  # the model's channels name the rows' selects
        self._publish_nodes()
        self._publish_run()
        # the first volume to segment; with none, a training volume (the views stayed black)
        shown = [*request.targetVolumes, *(volume for volume, _ in request.trainingPairs)]
        if shown:
            state.shown_volume = reference_of(shown[0]).GetID()
        self._show_results()
        self.refresh_jobs_now()
        self.say(f"{'resumed' if resume else 'opened'} {folder.name}")

    def resume_running_job(self) -> None:
        """After a server restart: follow the work folder's running job again."""
        running = [info for info in self.session.logic.adaptationJobs() if info.state in ("starting", "running")]
        if running:
            self.open_job_folder(running[0].folder)

    # -- downloads -------------------------------------------------------------------------------------------------
    def _attachment(self, name: str, data: bytes) -> dict:
        return {"name": name, "data": self.server.protocol.addAttachment(data)}

    @reports_errors
    def download_segmentation(self, kind: str) -> dict:
        node = self.session.node(self.state.download_segmentation)
        return self._attachment(*self.session.segmentation_file(node, kind, self.state.model_id))

    @reports_errors
    def download_adapter(self) -> dict:
        return self._attachment(*self.session.adapter_zip())


def serve(host: str = "127.0.0.1", port: int = 8080, work_dir: str | Path = "peftadapt-web",
          data_dir: str | Path | None = None, token: str | None = None) -> None:
    """Build the app and serve it until interrupted; prints the URL (with the token when one is required)."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # headless server: no X display
    os.environ["TRAME_ARGS"] = ""  # the server's settings come from here, not from peftadapt's own arguments
    work = Path(work_dir).expanduser().absolute()
    data = Path(data_dir).expanduser().absolute() if data_dir else None
    if data is not None and not data.is_dir():
        raise InputError(f"--data {data_dir}: not a folder")
    work.mkdir(parents=True, exist_ok=True)
    token = access.access_token(host, token)
    server = get_server("peftadapt", client_type="vue3")
    app = WebApp(server, work, data)
    app.resume_running_job()
    guard = access.token_middleware(token, access.is_loopback(host))
    server.controller.on_server_bind.add(lambda wslink_server, **_: wslink_server.app.middlewares.append(guard))

    def announce(**_):
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{server.port}/" + (f"?token={token}" if token else "")
        print(f"PEFTAdapt in the browser: {url}\nwork folder: {work}" + (f"\ndata folder: {data}" if data else ""),
              flush=True)

    server.controller.on_server_ready.add(announce)
    server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)
