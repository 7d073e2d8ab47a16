"""The report's interactive figures, with plotly: a curve panel as a chart, and a run's model over its data
(a 3-D surface, an extrapolation curve or decision regions), the counterparts of the PNGs that
:mod:`dtrain.train.figures` draws for TensorBoard, built from the same grid, ranges, points and colours."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from dtrain.report.panels import Panel, plottable, run_color
from dtrain.report.runs import RunData

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from dtrain.data.dataset import DataSet


def panel_figure(panel: Panel, runs: list[RunData]) -> go.Figure:
    """A curve panel as a plotly figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for line in panel.lines:
        values = plottable(line.values, panel.log)
        run = runs[line.run]
        # Short legend entries (the colour says which run; the table above gives its full label), full on hover.
        legend = f"{run.name} · {line.group or line.tag}"
        fig.add_trace(
            go.Scatter(
                x=line.steps,
                y=[None if math.isnan(v) else v for v in values],
                mode="lines+markers" if len(line.steps) < 3 else "lines",
                name=legend,
                hovertext=f"{run.label} · {line.tag}",
                hovertemplate="%{hovertext}<br>step %{x}: %{y:.4g}<extra></extra>",
                line={"color": run_color(line.run), "dash": line.style},
                line_width=line.width,
                opacity=line.opacity,
                legendgroup=legend,
                showlegend=line.show_legend,
            )
        )
        if line.end_text and np.isfinite(values).any():
            last = int(np.flatnonzero(np.isfinite(values))[-1])
            y = math.log10(values[last]) if panel.log else float(values[last])  # plotly places by log10 on log axes
            fig.add_annotation(x=int(line.steps[last]), y=y, text=line.end_text, showarrow=False, xanchor="left")
    for value, text in panel.references:
        # Labelled on the left: the trajectories' own names sit at their right ends.
        fig.add_hline(
            y=value,
            line_dash="dot",
            line_color="grey",
            line_width=1,
            annotation_text=text,
            annotation_position="top left",
            annotation_font_color="grey",
        )
    for index, step, text in panel.events:
        color = run_color(index)
        fig.add_vline(x=step, line_dash="dot", line_color=color, annotation_text=text, annotation_font_color=color)
    fig.update_layout(
        title={"text": panel.title + (f"<br><sup>{html.escape(panel.note)}</sup>" if panel.note else "")},
        xaxis_title="step",
        yaxis={"title": panel.ylabel, "type": "log" if panel.log else "linear"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "font": {"size": 11}},
        margin={"l": 60, "r": 20, "t": 70, "b": 40},
        template="plotly_white",
    )
    if panel.yrange is not None:
        fig.update_yaxes(range=list(panel.yrange))
    return fig


def model_plot(predict: Any, data: DataSet) -> go.Figure | None:
    """The interactive counterpart of :func:`dtrain.train.figures.model_figures`: a 3-D surface with the points
    (2-input regression), the prediction against the points with the training range shaded (1-input
    regression), or the decision regions and boundary under the points (2-input classification); None where
    no picture is meaningful, or where the rows are not in memory (a Dataset read from disk)."""
    if len(data.train) == 0 or not data.in_memory:
        return None
    if data.task == "regression" and data.num_inputs == 2:
        return _surface_plot(predict, data)
    if data.task == "regression" and data.num_inputs == 1:
        return _curve_plot(predict, data)
    if data.task == "classification" and data.num_inputs == 2:
        return _decision_plot(predict, data)
    return None


def _surface_plot(predict: Any, data: DataSet) -> go.Figure:
    import plotly.graph_objects as go

    from dtrain.train.figures import GRID_2D, input_ranges, labelled_splits, point_budget, predict_regression, subsample

    (x0_lo, x0_hi), (x1_lo, x1_hi) = input_ranges(data)
    a0, a1 = np.linspace(x0_lo, x0_hi, GRID_2D), np.linspace(x1_lo, x1_hi, GRID_2D)
    g0, g1 = np.meshgrid(a0, a1, indexing="ij")
    z = predict_regression(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data).reshape(g0.shape)
    fig = go.Figure()
    # plotly's surface has z[row = y index][column = x index]: the transpose of our (x0, x1) grid.
    fig.add_trace(
        go.Surface(
            x=a0, y=a1, z=plottable(z, False).T, colorscale="Viridis", opacity=0.7, showscale=False, name="model"
        )
    )
    for label, split, color in labelled_splits(data):
        x, y = subsample(split, point_budget(data, split))
        fig.add_trace(
            go.Scatter3d(
                x=x[:, 0], y=x[:, 1], z=y[:, 0], mode="markers", marker={"size": 2.5, "color": _hex(color)}, name=label
            )
        )
    # A fixed box and matplotlib's default viewpoint: plotly's automatic aspect stretches z in a wide cell.
    scene = {
        "xaxis_title": "x0",
        "yaxis_title": "x1",
        "zaxis_title": "y",
        "aspectmode": "manual",
        "aspectratio": {"x": 1, "y": 1, "z": 0.7},
        "camera": {"eye": {"x": 1.05, "y": -1.3, "z": 0.75}},
    }
    fig.update_layout(scene=scene, legend={"x": 0, "y": 1})
    return fig


def _curve_plot(predict: Any, data: DataSet) -> go.Figure:
    import plotly.graph_objects as go

    from dtrain.train.figures import (
        GRID_1D,
        data_range,
        input_ranges,
        labelled_splits,
        padded,
        point_budget,
        predict_regression,
        subsample,
    )

    ((lo, hi),) = input_ranges(data)
    grid = np.linspace(lo, hi, GRID_1D)
    prediction = predict_regression(predict, grid[:, None], data)
    fig = go.Figure()
    if "outer" in data.val:  # as in the PNG: only an outer split makes the training range worth shading
        train_x = data.train.x[:, 0]
        fig.add_vrect(
            x0=float(train_x.min()),
            x1=float(train_x.max()),
            fillcolor="green",
            opacity=0.12,
            line_width=0,
            annotation_text="training range",
            annotation_position="top left",
        )
    for label, split, color in labelled_splits(data):
        x, y = subsample(split, point_budget(data, split))
        fig.add_trace(
            go.Scatter(x=x[:, 0], y=y[:, 0], mode="markers", marker={"size": 4, "color": _hex(color)}, name=label)
        )
    fig.add_trace(go.Scatter(x=grid, y=plottable(prediction, False), line={"color": "black"}, name="prediction"))
    # Pinned to the data, as in the PNG: an extrapolating polynomial's huge values would flatten the points.
    y_lo, y_hi = padded(*data_range(data, lambda s: s.y), pad=0.15)
    fig.update_layout(xaxis={"title": "x", "range": [lo, hi]}, yaxis={"title": "y", "range": [y_lo, y_hi]})
    return fig


def _decision_plot(predict: Any, data: DataSet) -> go.Figure:
    import plotly.graph_objects as go

    from dtrain.train.figures import (
        GRID_2D,
        class_colors,
        input_ranges,
        labelled_splits,
        point_budget,
        predict_grid,
        subsample,
    )

    (x0_lo, x0_hi), (x1_lo, x1_hi) = input_ranges(data)
    a0, a1 = np.linspace(x0_lo, x0_hi, GRID_2D), np.linspace(x1_lo, x1_hi, GRID_2D)
    g0, g1 = np.meshgrid(a0, a1, indexing="ij")
    logits = predict_grid(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data)
    num_classes = max(logits.shape[1], data.num_classes, 2)
    colors = [_hex(c) for c in class_colors(num_classes)]
    classes = np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=1).reshape(g0.shape)
    # A discrete colour scale: class k fills [k/n, (k+1)/n] of the normalised range.
    scale = [[edge, colors[k]] for k in range(num_classes) for edge in (k / num_classes, (k + 1) / num_classes)]
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            x=a0,
            y=a1,
            z=classes.T,
            zmin=-0.5,
            zmax=num_classes - 0.5,
            colorscale=scale,
            opacity=0.3,
            showscale=False,
            name="predicted class",
            hovertemplate="x0=%{x:.3g}<br>x1=%{y:.3g}<br>predicted class %{z}<extra></extra>",
        )
    )
    # The boundary as the zero level of each class's margin over its best rival, as the PNG draws it.
    num_logits = logits.shape[1]
    for n, k in enumerate(range(num_logits) if num_logits > 2 else range(1, num_logits)):
        with np.errstate(invalid="ignore"):
            margin = (logits[:, k] - np.delete(logits, k, axis=1).max(axis=1)).reshape(g0.shape)
        fig.add_trace(
            go.Contour(
                x=a0,
                y=a1,
                z=plottable(margin, False).T,
                contours={"start": 0.0, "end": 0.0, "size": 1.0, "coloring": "lines"},
                colorscale=[[0, "black"], [1, "black"]],
                line={"width": 1.5},
                showscale=False,
                hoverinfo="skip",
                name="boundary",
                showlegend=n == 0,
            )
        )
    for (label, split, _), symbol in zip(labelled_splits(data), ("circle", "triangle-up", "square"), strict=False):
        x, y = subsample(split, point_budget(data, split))
        labels = y.reshape(-1).astype(int)
        point_colors = [colors[c] if 0 <= c < num_classes else "grey" for c in labels]
        marker = {"size": 6, "color": point_colors, "symbol": symbol, "line": {"width": 0.5, "color": "black"}}
        fig.add_trace(go.Scatter(x=x[:, 0], y=x[:, 1], mode="markers", marker=marker, name=f"{label} (true class)"))
    fig.update_layout(xaxis={"title": "x0", "range": [x0_lo, x0_hi]}, yaxis={"title": "x1", "range": [x1_lo, x1_hi]})
    return fig


def _hex(color: Any) -> str:
    """A matplotlib colour ("tab:blue", an RGBA tuple) as CSS hex, which plotly understands."""
    from matplotlib.colors import to_hex

    return to_hex(color)
