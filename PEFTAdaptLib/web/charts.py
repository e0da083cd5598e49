"""Plotly figures (as plain JSON, drawn by the page) from the monitor's MRML tables: the Dice audit of every round
and the allocation of the adapter units. The tables are the ones the Slicer module plots, filled by the same
`AdaptationMonitor`."""
from __future__ import annotations

from ..mrml.logic import SceneRun
from ..mrml.monitor import NOT_KEPT, ON_STATES

ROUND_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_MARGINS = {"l": 50, "r": 10, "t": 36, "b": 40}
#: the page's dark theme (plotly's default is white)
_STYLE = {"paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)", "font": {"color": "#ddd"},
          "autosize": True}
_AXIS = {"gridcolor": "#444", "zerolinecolor": "#666"}


def table_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() if table.GetColumn(c).IsA("vtkStringArray")
             else table.GetValue(r, c).ToDouble() for c, name in enumerate(names)}
            for r in range(table.GetNumberOfRows())]


def dice_figure(runs: list[SceneRun]) -> dict:
    """One curve per round, each round continuing the step axis where the previous one ended, each audit with the 95 %
    interval of its gain over the round's start as an error bar, the state the round kept as a diamond, and the
    zero-shot Dice (round 1 at step 0) as a dashed line."""
    data, offset = [], 0
    for index, run in enumerate(runs):
        points = run.monitor.dice_band()
        colour = ROUND_COLOURS[index % len(ROUND_COLOURS)]
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"round {index + 1}",
                     "x": [offset + step for step, *_ in points], "y": [dice for _, dice, _, _ in points],
                     "error_y": {"type": "data", "symmetric": False, "color": colour, "thickness": 1,
                                 "array": [high - dice for _, dice, _, high in points],
                                 "arrayminus": [dice - low for _, dice, low, _ in points]},
                     "marker": {"color": colour, "size": 7}})
        kept = table_rows(run.monitor.kept_table)  # the state the round delivers, not one more audit
        if kept:
            data.append({"type": "scatter", "mode": "markers", "name": f"round {index + 1}: kept state",
                         "x": [offset + row["step"] for row in kept], "y": [row["dice"] for row in kept],
                         "marker": {"color": colour, "size": 11, "symbol": "diamond"}})
        offset += max([run.state.steps] + [int(step) for step, *_ in points])
    first = runs[0].monitor.dice_values() if runs else []
    if first:
        data.insert(0, {"type": "scatter", "mode": "lines", "name": "zero-shot", "x": [0, max(offset, 1)],
                        "y": [first[0][1]] * 2, "line": {"dash": "dash", "color": "#888"}, "hoverinfo": "y"})
    return {"data": data, "layout": {
        **_STYLE, "title": {"text": "Audit Dice (held-out volumes)", "font": {"size": 14}}, "margin": _MARGINS,
        "xaxis": {**_AXIS, "title": {"text": "training step (rounds one after another)"}, "rangemode": "tozero"},
        "yaxis": {**_AXIS, "title": {"text": "Dice"}, **({} if data else {"range": [0, 1]})},  # plotly's empty: -1..4
        "legend": {"orientation": "h", "y": -0.3}}}


def _held_to_the_end(timeline: list[dict], steps: int) -> dict:
    """The allocation rounds' active-unit counts (a marker each), the last one held to the run's last step: one round
    is a line, not a lone point."""
    x, y = [row["step"] for row in timeline], [row["active_units"] for row in timeline]
    sizes = [7] * len(x)
    if x and steps > x[-1]:
        x, y, sizes = x + [steps], y + [y[-1]], sizes + [0]
    return {"x": x, "y": y, "marker": {"color": "#2ca02c", "size": sizes}}


def allocation(runs: list[SceneRun]) -> tuple[dict, list[dict]]:
    """The latest round that allocated units: active parameters per layer and active units over the steps (one
    figure, two panels), and its units as table rows."""
    for run in reversed(runs):
        units = table_rows(run.monitor.units_table)
        if units:
            break
    else:
        return {"data": [], "layout": {**_STYLE, "title": {"text": "Adapter allocation: no units yet (or a fixed "
                                                           "method)", "font": {"size": 13}}, "margin": _MARGINS,
                                       "xaxis": {"visible": False}, "yaxis": {"visible": False}}}, []
    layers = table_rows(run.monitor.layers_table)
    not_kept = run.state.kept == "start"
    timeline = table_rows(run.monitor.timeline_table)
    figure = {"data": [
        {"type": "bar", "name": "active parameters", "x": [row["layer"] for row in layers],
         "y": [row["active_parameters"] for row in layers], "marker": {"color": "#ff7f0e"}},
        {"type": "scatter", "mode": "lines+markers", "name": "active units", "xaxis": "x2", "yaxis": "y2",
         "line": {"shape": "hv", "color": "#2ca02c"}, **_held_to_the_end(timeline, run.state.steps)},
    ], "layout": {
        **_STYLE, "title": {"text": "Adapter allocation" + (f"<br><sub>{NOT_KEPT}</sub>" if not_kept else ""),
                            "font": {"size": 14}}, "margin": {**_MARGINS, "t": _MARGINS["t"] + 20 * not_kept, "b": 90},
        "showlegend": False,
        "xaxis": {**_AXIS, "domain": [0, 0.58], "tickfont": {"size": 8}, "title": {"text": "layer"}},
        "yaxis": {**_AXIS, "title": {"text": "active parameters"}},
        "xaxis2": {**_AXIS, "domain": [0.7, 1], "anchor": "y2", "title": {"text": "step"}},
        "yaxis2": {**_AXIS, "anchor": "x2", "title": {"text": "active units"}, "rangemode": "tozero"}}}
    rows = [{"unit": row["unit"].split("::")[0], "parameters": int(row["parameters"]), "state": ON_STATES[row["state"]],
             "adapter": row["family"] + (f" r{int(row['rank'])}" if row["rank"] else "")}
            for row in units if row["state"] in ON_STATES]  # as the bars: the units the adapter holds
    return figure, sorted(rows, key=lambda row: -row["parameters"])
