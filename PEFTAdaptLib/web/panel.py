"""The page: Slicer's layout (slice views and 3D view, the module panel on the left, charts below the views) in
Vuetify widgets bound to the app's state. Widget ids are what the end-to-end test clicks."""
from __future__ import annotations

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html, plotly
from trame.widgets import vuetify3 as v3

from .access import MAX_UPLOAD_BYTES

PANEL_WIDTH = 430
APP_BAR_HEIGHT = 48  # Vuetify's compact app bar
CHARTS_HEIGHT = 300
SELECT = {"density": "compact", "hide_details": True, "variant": "outlined", "item_title": "title",
          "item_value": "value"}
FIELD = {"density": "compact", "hide_details": "auto", "variant": "outlined"}


def _narrow_headers(columns: tuple[tuple[str, str], ...], nowrap: bool) -> list[dict]:
    """Headers of a table in a narrow pane: tight cells; the first column (a long name) breaks at any character."""
    tight = "padding: 0 6px"
    return [{"title": title, "key": key, "nowrap": nowrap and index > 0, "headerProps": {"style": tight},
             "cellProps": {"style": tight + ("; overflow-wrap: anywhere" if index == 0 else "")}}
            for index, (title, key) in enumerate(columns)]


UNIT_HEADERS = _narrow_headers((("layer", "unit"), ("parameters", "parameters"), ("adapter", "adapter"),
                                ("state", "state")), nowrap=True)
JOB_HEADERS = _narrow_headers((("job", "name"), ("method", "method"), ("state", "state"), ("audit Dice", "dice"),
                               ("", "open")), nowrap=False)


def build(app, layout_manager) -> VAppLayout:
    with VAppLayout(app.server, fill_height=True) as layout:
        layout.root.theme = "dark"
        _app_bar(app)
        with v3.VNavigationDrawer(permanent=True, width=PANEL_WIDTH, location="left"):
            _panel(app)
        with v3.VMain():
            with html.Div(style=f"display: grid; grid-template-rows: minmax(0, 1fr) {CHARTS_HEIGHT}px; "
                                f"height: calc(100vh - {APP_BAR_HEIGHT}px);"):
                with html.Div(style="min-height: 0; overflow: hidden; position: relative;", id="views"):
                    layout_manager.initialize_layout_grid(layout)
                _charts()
    return layout


def _app_bar(app) -> None:
    with v3.VAppBar(density="compact", height=APP_BAR_HEIGHT):
        v3.VAppBarTitle("PEFTAdapt")
        v3.VSelect(label="Show volume", items=("volumes",), v_model=("shown_volume", None), id="shown-volume",
                   style="max-width: 260px;", classes="mx-2", **SELECT)
        v3.VBtn("Demo data", prepend_icon="mdi-brain", click=app.load_demo, id="demo", variant="tonal",
                disabled=("busy",), classes="mx-2")
        v3.VProgressCircular(indeterminate=True, size=20, width=2, v_show=("busy || trame__busy",), classes="mx-2")
        v3.VChip("{{ run_phase }}", v_show=("run_phase",), id="phase", size="small", classes="mx-2")


#: a select's label naming the model's first channel, when it takes several ("Volume 1 (FLAIR)")
FIRST_CHANNEL = "(channel_names.length > 1 ? ` (${channel_names[0]})` : '')"
#: the model's channels after the first (none for most models), each with a select of its own beside the first's
OTHER_CHANNELS = "(name, c) in channel_names.slice(1)"


def _pairs_editor(app, key: str, prefix: str, add_text: str) -> None:
    """The rows of one of the app's pair lists (`PAIR_LISTS`), each a volume per channel of the model and a
    segmentation; ids `<prefix>-<i>-volume`, `<prefix>-<i>-channel-<c>` (the model's channel c, counted from 0),
    `<prefix>-<i>-segmentation` (the end-to-end test clicks them). A channel left empty in a row that has another
    shows as an error."""
    select = {"items": ("volumes",), "classes": "mb-1", **SELECT}
    started = f"({key}[i].volume || ({key}[i].channels || []).some(Boolean))"  # the row has a channel chosen
    with html.Div(v_for=f"(pair, i) in {key}", key="i", classes="d-flex align-center mb-3"):
        with html.Div(style="flex: 1; min-width: 0;"):
            v3.VSelect(label=(f"`Volume ${{i + 1}}` + {FIRST_CHANNEL}",), model_value=(f"{key}[i].volume",),
                       id=(f"`{prefix}-${{i}}-volume`",),
                       error=(f"!{key}[i].volume && {started}",),
                       update_modelValue=f"{key}[i].volume = $event; flushState('{key}')", **select)
            with html.Div(v_for=OTHER_CHANNELS, key="c"):  # a Vuetify widget has a key of its own
                v3.VSelect(label=("`Volume ${i + 1} (${name})`",), model_value=(f"{key}[i].channels[c]",),
                           id=(f"`{prefix}-${{i}}-channel-${{c + 1}}`",),
                           error=(f"!{key}[i].channels[c] && {started}",),
                           update_modelValue=f"{key}[i].channels[c] = $event; flushState('{key}')", **select)
            v3.VSelect(label=("`Segmentation ${i + 1}`",), model_value=(f"{key}[i].segmentation",),
                       id=(f"`{prefix}-${{i}}-segmentation`",),
                       update_modelValue=f"{key}[i].segmentation = $event; flushState('{key}')",
                       **{**select, "items": ("segmentations",)})
        v3.VBtn(icon="mdi-close", size="small", variant="text", click=(app.remove_pair, f"['{key}', i]"),
                id=(f"`{prefix}-${{i}}-remove`",),
                raw_attrs=[f":aria-label=\"`{add_text.replace('Add', 'Remove', 1)} ${{i + 1}}`\""])
    v3.VBtn(add_text, prepend_icon="mdi-plus", size="small", variant="tonal", click=(app.add_pair, f"['{key}']"),
            id=f"add-{prefix}")


def _targets_editor(app) -> None:
    """The volumes to segment after adapting; with a model of several channels, each chosen volume (its first
    channel) gets a select per other channel: ids `target-<j>-channel-<c>`."""
    v3.VSelect(label=(f"'Segment after adapting' + {FIRST_CHANNEL}",), items=("volumes",), v_model=("targets", []),
               multiple=True, chips=True, id="targets", classes="mt-3", **SELECT)
    with html.Div(v_if=("channel_names.length > 1",)):
        with html.Div(v_for="(target, j) in targets", key="target"), html.Div(v_for=OTHER_CHANNELS, key="c"):
            v3.VSelect(items=("volumes",), classes="mt-1",
                       label=("`${name} for ${(volumes.find(v => v.value === target) || {}).title}`",),
                       model_value=("(target_channels[target] || [])[c]",), id=("`target-${j}-channel-${c + 1}`",),
                       error=("!(target_channels[target] || [])[c]",),
                       update_modelValue=(app.set_target_channel, "[target, c, $event]"), **SELECT)


def _section(title: str, value: str):
    return v3.VExpansionPanel(title=title, value=value)


def _panel(app) -> None:
    # shown while there is a message: a closed alert keeps no flag of its own that would hide the next one
    with v3.VAlert(model_value=("!!message",), type=("message_kind",), density="compact", closable=True, id="message",
                   classes="ma-2 text-body-2", click_close="message = ''"):
        html.Div("{{ message }}", title=("message",),
                 style="white-space: nowrap; overflow: hidden; text-overflow: ellipsis;")
    with v3.VExpansionPanels(multiple=True, v_model=("open_sections", ["data", "training", "method", "run"]),
                             variant="accordion"):
        with _section("Data", "data"), v3.VExpansionPanelText():
            _data_section(app)
        with _section("Model", "model"), v3.VExpansionPanelText():
            v3.VSelect(label="Foundation model", items=("models",), v_model=("model_id", None), id="model",
                       **SELECT)
            html.Div("{{ model_description }}", classes="text-caption my-1")
            with html.Div(v_show=("unlisted_models.length",), id="unlisted-models", classes="text-caption my-1"):
                html.Div("Not offered from the model folder:")
                html.Div("{{ line }}", v_for="line in unlisted_models", key="line")
            with html.Div(classes="d-flex align-center", v_if=("has_data_folder",)):
                v3.VTextField(label="Model folder (in the data folder)", v_model=("model_folder", ""),
                              id="model-folder", **FIELD)
                v3.VBtn("Load", click=app.load_model_folder, id="load-model-folder", variant="tonal",
                        classes="ml-2")
        with _section("Training and audit pairs", "training"), v3.VExpansionPanelText():
            _pairs_editor(app, "pairs", "pair", "Add training pair")
            html.Div("Audit pairs (held out: the adapted model replaces the source only if its Dice gain on them is "
                     "larger than their noise)", classes="text-caption mt-3 mb-1")
            _pairs_editor(app, "audit_pairs", "audit", "Add audit pair")
            html.Div("{{ audit_advice }}", v_show=("audit_advice",), id="audit-advice", classes="text-caption mt-1")
            _targets_editor(app)
        with _section("Method", "method"), v3.VExpansionPanelText():
            v3.VSelect(label="Method", items=("methods",), v_model=("method", None), id="method", **SELECT)
            with html.Div(classes="d-flex mt-2"):
                v3.VTextField(label="Budget (% of the model's parameters)", v_model=("budget_percent", "1"),
                              v_if=("method_takes_budget",), id="budget", type="number", **FIELD)
                v3.VSelect(label="Rank", items=("method_ranks",), v_model=("rank", None), v_if=("method_ranks.length",),
                           id="rank", density="compact", hide_details=True, variant="outlined")
            html.Div("{{ budget_text }}", classes="text-caption")
            with html.Div(classes="d-flex mt-2"):
                v3.VTextField(label="Steps", v_model=("steps", "200"), id="steps", type="number", **FIELD)
                v3.VSelect(label="Device", items=("devices",), v_model=("device", "auto"), id="device",
                           classes="ml-1", density="compact", hide_details=True, variant="outlined")
            with html.Div(classes="d-flex mt-2"):
                v3.VTextField(label="Patch size (voxels, blank: the model's)", v_model=("patch_size", ""),
                              id="patch-size", type="number", **FIELD)
                v3.VTextField(label="Audit every (steps)", v_model=("audit_every", "20"), id="audit-every",
                              type="number", classes="ml-1", **FIELD)
        with _section("Run", "run"), v3.VExpansionPanelText():
            with html.Div(classes="d-flex flex-wrap ga-2", id="run-buttons"):  # wraps: all on the panel at any width
                v3.VBtn("Start", color="primary", click=app.start, id="start", disabled=("running || busy",))
                v3.VBtn("Cancel", click=app.cancel, id="cancel", disabled=("!running",))
                v3.VBtn("Re-adapt", click=app.readapt, id="readapt", disabled=("!can_readapt || busy",),
                        prepend_icon="mdi-refresh")
                v3.VBtn("Next slice to check", click=app.next_slice, id="next-slice", disabled=("!can_readapt",),
                        prepend_icon="mdi-target")
                v3.VBtn("Slice is right", click=app.mark_slice_checked, id="mark-checked",
                        disabled=("!can_readapt",), prepend_icon="mdi-check")
            v3.VProgressLinear(model_value=("run_progress", 0), height=6, classes="my-2", color="primary",
                               indeterminate=("running && !run_progress",))
            html.Div("{{ run_text }}", id="run-text", classes="text-body-2", style="white-space: pre-line")
            html.Div("{{ trainable_text }}", classes="text-caption")
            html.Div("{{ allocation_text }}", classes="text-caption", style="white-space: pre-line")
        with _section("Correct (segment editor)", "editor"), v3.VExpansionPanelText():
            v3.VSelect(label="Segmentation to edit", items=("segmentations",), v_model=("edit_segmentation", None),
                       id="edit-segmentation", classes="mb-2", **SELECT)
            _named_by_their_tooltips(app.editor_ui())
        with _section("Downloads", "downloads"), v3.VExpansionPanelText():
            v3.VSelect(label="Segmentation", items=("segmentations",), v_model=("download_segmentation", None),
                       id="download-segmentation", classes="mb-2", **SELECT)
            with html.Div(classes="d-flex flex-wrap"):
                for kind, label in (("seg.nrrd", ".seg.nrrd"), ("nii.gz", "NIfTI")):
                    v3.VBtn(label, prepend_icon="mdi-download", size="small", variant="tonal", classes="mr-2 mb-2",
                            id=f"download-{kind.replace('.', '-')}", disabled=("!download_segmentation",),
                            click=_download(app, app.download_segmentation, f"['{kind}']"))
                v3.VBtn("Adapter (zip)", prepend_icon="mdi-download", size="small", variant="tonal",
                        classes="mr-2 mb-2", id="download-adapter", disabled=("!has_adapter",),
                        click=_download(app, app.download_adapter, "[]"))
        with _section("Jobs in the work folder", "jobs"), v3.VExpansionPanelText():
            v3.VBtn("Refresh", size="small", variant="tonal", click=app.refresh_jobs, id="refresh-jobs")
            with v3.VDataTable(headers=("job_headers", JOB_HEADERS), items=("jobs", []), density="compact",
                               items_per_page=5, id="jobs"):
                with v3.Template(raw_attrs=['v-slot:item.state="{ item }"']):
                    html.Span("{{ item.state }}", title=("item.message",))
                with v3.Template(raw_attrs=['v-slot:item.open="{ item }"']):
                    # the panel follows one job: none is opened or resumed while one runs (the server refuses too)
                    v3.VBtn("Open", size="x-small", variant="tonal", click=(app.open_job, "[item.name]"),
                            disabled=("running || busy",), classes="job-open")
                    v3.VBtn("Resume", size="x-small", variant="tonal", classes="ml-1 job-resume",
                            v_if="item.resumable", click=(app.resume_job, "[item.name]"),
                            disabled=("running || busy",))


def _text(element) -> str:
    return "".join(child if isinstance(child, str) else _text(child) for child in element.children)


def _named_by_their_tooltips(element) -> None:
    """trame-slicer's icon buttons (the segment editor's tools, the views' camera and 3D buttons) name themselves in a
    tooltip only, which a screen reader does not take for the button's name: the tooltip's text becomes their
    aria-label."""
    for child in element.children:
        if isinstance(child, str):
            continue
        tooltip = next((c for c in child.children if isinstance(c, v3.VTooltip)), None)
        if isinstance(child, v3.VBtn) and tooltip is not None:
            child.props += [("aria_label", "aria-label")]
            child.aria_label = _text(tooltip)
        else:
            _named_by_their_tooltips(child)


def named_by_their_tooltips(populate):
    """A view's gutter builder (trame-slicer's) whose icon buttons are named by their tooltips."""
    def build(server, view_id, view) -> None:
        with html.Div(style="display: contents") as gutter:  # no box of its own: the gutter lays out as before
            populate(server, view_id, view)
        _named_by_their_tooltips(gutter)
    return build


def _data_section(app) -> None:
    with v3.VBtnToggle(v_model=("load_as", "volume"), mandatory=True, density="compact", divided=True, id="load-as"):
        v3.VBtn("Volume", value="volume", size="small", id="load-as-volume")
        v3.VBtn("Label map of…", value="label", size="small", id="load-as-label")
    v3.VSelect(label="…drawn on volume", items=("volumes",), v_model=("label_of", None), v_show="load_as === 'label'",
               id="label-of", classes="mt-2", **SELECT)
    v3.VAutocomplete(label="…in another numbering: label map (.json)", items=("label_maps", []),
                     v_model=("label_map", None), v_show="load_as === 'label'", clearable=True, id="label-map",
                     classes="mt-2", density="compact", hide_details=True, variant="outlined")
    with html.Div(classes="d-flex align-center mt-2", v_if=("has_data_folder",)):
        v3.VAutocomplete(label="File in the data folder", items=("data_files", []), v_model=("data_pick", None),
                         id="data-pick", density="compact", hide_details=True, variant="outlined")
        v3.VBtn("Load", click=app.load_from_data, id="load-data", variant="tonal", classes="ml-2",
                disabled=("!data_pick || busy",))
    check = (f"(files => files.some(f => f.size > {MAX_UPLOAD_BYTES}) ? "
             f"(message_kind = 'error', message = files.find(f => f.size > {MAX_UPLOAD_BYTES}).name + "
             f"': over the upload limit of {MAX_UPLOAD_BYTES >> 20} MiB') : "
             f"trigger('{app.server.controller.trigger_name(app.upload)}', [files]))([...$event.target.files])")
    v3.VFileInput(label="Upload NIfTI / NRRD / MHA / MGZ, or a label map", multiple=True, change=check, id="upload",
                  classes="mt-2", density="compact", hide_details=True, variant="outlined", prepend_icon="mdi-upload",
                  accept=".nii,.nii.gz,.gz,.nrrd,.mha,.mgz,.mgh,.json")


def _download(app, handler, args: str) -> str:
    name = app.server.controller.trigger_name(handler)
    return f"trigger('{name}', {args}).then(r => r && utils.download(r.name, r.data, 'application/octet-stream'))"


def _charts() -> None:
    with html.Div(style="display: flex; overflow: hidden; border-top: 1px solid #444;"):
        with html.Div(style="flex: 1 1 42%; min-width: 0;", id="dice-chart"):
            plotly.Figure(state_variable_name="dice_chart", display_mode_bar=False, responsive=True,
                          style="width: 100%; height: 100%;")
        with html.Div(style="flex: 1 1 58%; min-width: 0; display: flex;", id="allocation"):
            with html.Div(style="flex: 1 1 45%; min-width: 0;", id="allocation-chart"):
                plotly.Figure(state_variable_name="allocation_chart", display_mode_bar=False, responsive=True,
                              style="width: 100%; height: 100%;")
            with html.Div(style=f"flex: 1 1 55%; min-width: 0; height: {CHARTS_HEIGHT}px; overflow-y: auto;"):
                v3.VDataTable(headers=("unit_headers", UNIT_HEADERS), items=("units", []), density="compact",
                              items_per_page=-1, id="units", hide_default_footer=True,
                              classes="text-caption")
