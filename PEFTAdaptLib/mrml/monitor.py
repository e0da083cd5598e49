"""Worker events → MRML table, plot and allocation nodes: the live Dice audit and the allocator's choices.

The nodes are ordinary scene nodes, so the curves are saved with the scene and stay reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence

import vtk

#: dice_low/dice_high: the audit Dice moved by the 95 % interval of its gain over the start (the band the chart
#: draws: a state is kept only when the band's lower edge clears the start)
DICE_COLUMNS = ("step", "dice", "dice_low", "dice_high")
KEPT_COLUMNS = ("step", "dice")
LOSS_COLUMNS = ("step", "loss")
AGREEMENT_COLUMNS = ("step", "agreement")
UNIT_COLUMNS = ("unit", "site", "family", "rank", "parameters", "utility", "delta_dice", "state")
LAYER_COLUMNS = ("layer", "active_parameters")
TIMELINE_COLUMNS = ("step", "active_units", "budget_used")
LAYERS_TITLE = "Active adapter parameters per layer"
#: SEA-PEFT's controller states (seapeft/controller.py) of a unit whose gate is on, in words a panel shows; spelled
#: here because the front-ends need no torch, which that package imports (a test keeps the two equal)
ON_STATES = {"active": "on", "active_guard": "new", "demoting": "leaving"}
#: said by the allocation views of a run that kept its start: its units were trained, but the adapter is not them
NOT_KEPT = "trained, not kept (the run kept its start)"


def _new_table(scene, name: str, columns: Sequence[str], string_columns: Sequence[str] = ()):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for column in columns:
        array = vtk.vtkStringArray() if column in string_columns else vtk.vtkDoubleArray()
        array.SetName(column)
        table.AddColumn(array)
    return table


def _append_row(table_node, values: Sequence) -> None:
    table = table_node.GetTable()
    row = table.InsertNextBlankRow()
    for column, value in enumerate(values):
        table.SetValue(row, column, vtk.vtkVariant(value))
    table.Modified()
    table_node.Modified()


def _dice_band(event: dict) -> tuple[float, float, float]:
    """(Dice, low, high): the gain's interval around the Dice; without one (the start, label-free) a point."""
    dice, gain = event["dice"], event.get("gain")
    if gain is None or event.get("gain_low") is None:
        return dice, dice, dice
    return dice, dice - (gain - event["gain_low"]), dice + (event.get("gain_high", gain) - gain)


class AdaptationMonitor:
    """Owns the table/plot nodes of one adaptation run and turns events into rows."""

    def __init__(self, scene, name: str = "PEFTAdapt"):
        self.scene = scene
        self.dice_table = _new_table(scene, f"{name} audit Dice", DICE_COLUMNS)
        self.loss_table = _new_table(scene, f"{name} training loss", LOSS_COLUMNS)
        self.units_table = _new_table(scene, f"{name} adapter units", UNIT_COLUMNS,
                                      string_columns=("unit", "site", "family", "state"))
        self.layers_table = _new_table(scene, f"{name} parameters per layer", LAYER_COLUMNS, string_columns=("layer",))
        self.timeline_table = _new_table(scene, f"{name} allocation timeline", TIMELINE_COLUMNS)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} audit Dice")
        self.chart.SetTitle("Audit Dice during adaptation")
        self.chart.SetXAxisTitle("training step")
        self.chart.SetYAxisTitle("Dice (held-out audit volumes)")
        self.dice_series = self._series(self.dice_table, "audit Dice", "step", "dice", (0.1, 0.4, 0.9))
        self.chart.AddAndObservePlotSeriesNodeID(self.dice_series.GetID())
        for column, label in (("dice_low", "95 % band, low"), ("dice_high", "95 % band, high")):
            edge = self._series(self.dice_table, f"audit Dice {label}", "step", column, (0.55, 0.7, 0.95))
            edge.SetPlotType(edge.PlotTypeLine)
            edge.SetLineStyle(edge.LineStyleDash)
            self.chart.AddAndObservePlotSeriesNodeID(edge.GetID())
        # the state the run delivers (the `validation` event) as its own series: not one more audit point
        self.kept_table = _new_table(scene, f"{name} kept state", KEPT_COLUMNS)
        kept = self._series(self.kept_table, "kept state", "step", "dice", (0.9, 0.2, 0.1))
        kept.SetMarkerStyle(kept.MarkerStyleDiamond)
        self.chart.AddAndObservePlotSeriesNodeID(kept.GetID())
        self.agreement_table = _new_table(scene, f"{name} ESH agreement", AGREEMENT_COLUMNS)
        self.agreement_series = self._series(self.agreement_table, "ESH/decoder agreement (label-free)", "step",
                                             "agreement", (0.8, 0.2, 0.6))
        self.chart.AddAndObservePlotSeriesNodeID(self.agreement_series.GetID())
        self.layers_chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} parameters per layer")
        self.layers_chart.SetTitle(LAYERS_TITLE)
        layers = self._series(self.layers_table, "active parameters", "layer", "active_parameters", (0.9, 0.5, 0.1))
        layers.SetPlotType(layers.PlotTypeBar)
        layers.SetLabelColumnName("layer")
        self.layers_chart.AddAndObservePlotSeriesNodeID(layers.GetID())
        self.timeline_chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} allocation timeline")
        self.timeline_chart.SetTitle("Active adapter units over training")
        timeline = self._series(self.timeline_table, "active units", "step", "active_units", (0.2, 0.6, 0.2))
        timeline.SetPlotType(timeline.PlotTypeLine)
        self.timeline_chart.AddAndObservePlotSeriesNodeID(timeline.GetID())
        self._units: dict[str, dict] = {}

    def _series(self, table, name: str, x: str, y: str, color):
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(x)
        series.SetYColumnName(y)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(*color)
        return series

    def handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "audit" and "dice" in event:
            _append_row(self.dice_table, (event["step"], *_dice_band(event)))
        elif kind == "validation" and "dice" in event:
            _append_row(self.kept_table, (event["step"], event["dice"]))
        elif kind == "agreement":  # label-free: ESH/decoder agreement, plus Dice when an evaluation reference exists
            _append_row(self.agreement_table, (event["step"], event["agreement"]))
            if event.get("dice") is not None:
                _append_row(self.dice_table, (event["step"], *_dice_band(event)))
        elif kind == "step" and "loss" in event:
            _append_row(self.loss_table, (event["step"], event["loss"]))
        elif kind in ("unit_audit", "unit_state") and "unit" in event:
            self._update_unit(event)
        elif kind == "allocation" and "active_units" in event:
            _append_row(self.timeline_table, (event["step"], event["active_units"], event.get("budget_used", 0)))
            self._update_layers()
        elif kind == "kept_allocation":  # the restored state's units (their unit_state events came first)
            self._update_layers()
        if kind == "validation" and event.get("kept") == "start":
            self.layers_chart.SetTitle(f"{LAYERS_TITLE}: {NOT_KEPT}")

    def _update_unit(self, event: dict) -> None:
        """One row per unit; an event updates only the fields it carries."""
        fields = {"unit": "unit", "site": "site", "family": "family", "rank": "rank", "parameters": "cost",
                  "utility": "utility", "delta_dice": "delta_dice", "state": "state"}
        unit = event["unit"]
        known = self._units.setdefault(unit, {"row": None, "unit": unit, "site": "", "family": "", "rank": 0,
                                              "parameters": 0, "utility": 0.0, "delta_dice": 0.0, "state": ""})
        for column, key in fields.items():
            if event.get(key) is not None:
                known[column] = event[key]
        values = [known[column] for column in UNIT_COLUMNS]
        if known["row"] is None:
            known["row"] = self.units_table.GetTable().GetNumberOfRows()
            _append_row(self.units_table, values)
            return
        table = self.units_table.GetTable()
        for column, value in enumerate(values):
            table.SetValue(known["row"], column, vtk.vtkVariant(value))
        table.Modified()
        self.units_table.Modified()

    def _update_layers(self) -> None:
        """Active parameters per site, from the units' latest states (bar chart of the allocation)."""
        per_layer: dict[str, int] = {}
        for unit in self._units.values():
            if unit["state"] in ON_STATES:
                per_layer[unit["site"]] = per_layer.get(unit["site"], 0) + int(unit["parameters"])
        table = self.layers_table.GetTable()
        table.SetNumberOfRows(0)
        for layer, count in sorted(per_layer.items()):
            _append_row(self.layers_table, (layer, count))
        self.layers_table.Modified()

    def dice_values(self) -> list[tuple[float, float]]:
        return [(step, dice) for step, dice, _, _ in self.dice_band()]

    def dice_band(self) -> list[tuple[float, float, float, float]]:
        """(step, Dice, band low, band high) per audit."""
        table = self.dice_table.GetTable()
        return [tuple(table.GetValue(r, c).ToDouble() for c in range(4)) for r in range(table.GetNumberOfRows())]
