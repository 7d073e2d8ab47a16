"""Pictures of the model at an evaluation: what it predicts over the input space, against the data.

- 2-input regression: the fitted surface over the input square, the data points scattered on it
  (the original example's surface plot), tag ``figures/surface``;
- 1-input regression: the prediction curve against the data, tag ``figures/extrapolation``; when the data
  has an ``outer`` split (``sine``), the training range is shaded and the plot spans the outer points, so
  extrapolation shows at a glance;
- 2-input classification: the decision regions and boundaries over the points, tag
  ``figures/decision_boundary``.

Anything else (more than 2 inputs, 1-input classification, an empty training split) gives no figure.

matplotlib is imported inside the functions, so importing this module costs nothing when figures are
off. Figures are built with the object API (``matplotlib.figure.Figure`` on an Agg canvas), never pyplot:
no global figure registry, no backend selection, no display.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from dtrain.data.dataset import DataSet, Split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Predict = Callable[[torch.Tensor], torch.Tensor]

# Resolution of the model's evaluation grid: smooth enough to look continuous, small enough that building a
# figure (model included, drawing aside) takes about 0.02-0.2 s on a CPU for the models dtrain trains.
GRID_2D = 60
GRID_1D = 400
# More points than this turn a scatter into a blot and slow rendering; beyond it we subsample.
MAX_POINTS = 2000
# Share of the data's span added on each side, so points on the edge are not cut by the frame.
PAD = 0.05
DPI = 100


def model_figures(predict: Predict, data: DataSet) -> dict[str, Figure]:
    """Figures of ``predict`` over the input space of ``data``, keyed by TensorBoard tag.

    ``predict`` maps a float tensor [N, inputs] (on the CPU, in the dtype of ``data.train.x``) to the model's
    output: [N, 1] for regression, logits [N, classes] for classification. The caller runs the model in eval
    mode on its device; this function only adds ``torch.no_grad()``.

    Returns ``{"figures/surface": ...}`` for 2-input regression, ``{"figures/extrapolation": ...}`` for
    1-input regression, ``{"figures/decision_boundary": ...}`` for 2-input classification, and ``{}`` where
    no picture is meaningful (more than 2 inputs, 1-input classification, an empty training split) or where the
    rows are not in memory (a Dataset read from disk: drawing its points would read it whole).
    """
    if len(data.train) == 0 or not data.in_memory:
        return {}
    inputs = data.num_inputs
    if data.task == "regression" and inputs == 2:
        return {"figures/surface": _surface(predict, data)}
    if data.task == "regression" and inputs == 1:
        return {"figures/extrapolation": _curve(predict, data)}
    if data.task == "classification" and inputs == 2:
        return {"figures/decision_boundary": _decision_boundary(predict, data)}
    return {}


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg and return its pixels as an (H, W, 3) uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    # buffer_rgba() is a view of the canvas's memory: copy, so the array outlives the next draw.
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------------------------------------
# The three pictures


def _surface(predict: Predict, data: DataSet) -> Figure:
    fig = new_figure(7.0, 5.5)
    ax = fig.add_subplot(projection="3d")
    (x0_lo, x0_hi), (x1_lo, x1_hi) = input_ranges(data)
    g0, g1 = np.meshgrid(np.linspace(x0_lo, x0_hi, GRID_2D), np.linspace(x1_lo, x1_hi, GRID_2D), indexing="ij")
    z = predict_regression(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data).reshape(g0.shape)
    # Translucent, so the points under the surface (where the model overshoots) stay visible.
    # rcount/ccount: plot_surface would otherwise resample the grid down to 50x50.
    ax.plot_surface(
        g0,
        g1,
        np.ma.masked_invalid(z),
        rcount=GRID_2D,
        ccount=GRID_2D,
        cmap="viridis",
        alpha=0.55,
        linewidth=0,
        antialiased=False,
    )
    for label, split, color in labelled_splits(data):
        x, y = subsample(split, point_budget(data, split))
        ax.scatter(x[:, 0], x[:, 1], y[:, 0], s=6, color=color, depthshade=False, label=label)
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    ax.set_zlabel("y")
    ax.set_title("Model surface over the inputs, with the data points")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _curve(predict: Predict, data: DataSet) -> Figure:
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    ((lo, hi),) = input_ranges(data)
    grid = np.linspace(lo, hi, GRID_1D)
    prediction = predict_regression(predict, grid[:, None], data)
    extrapolating = "outer" in data.val
    if extrapolating:
        # Only with an outer split: without one, the training range is (nearly) the whole plot and a
        # shade over everything says nothing.
        train_x = data.train.x[:, 0]
        ax.axvspan(float(train_x.min()), float(train_x.max()), color="tab:green", alpha=0.12, label="training range")
    for label, split, color in labelled_splits(data):
        x, y = subsample(split, point_budget(data, split))
        ax.scatter(x[:, 0], y[:, 0], s=5, color=color, alpha=0.6, linewidths=0, label=label)
    ax.plot(grid, prediction, color="black", linewidth=1.5, label="prediction")
    ax.set_xlim(lo, hi)
    # Pin y to the data: a polynomial extrapolating far out can reach huge values, and autoscaling to them
    # would squash the data to a flat line. Where the prediction leaves the frame is itself the message.
    ax.set_ylim(*padded(*data_range(data, lambda s: s.y), pad=0.15))
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    if extrapolating:
        ax.set_title("Extrapolation: prediction inside and beyond the training range")
    else:
        ax.set_title("Prediction against the data")
    # Below the axes: inside, it would hide points wherever it went.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 6), fontsize="small")
    return fig


def _decision_boundary(predict: Predict, data: DataSet) -> Figure:
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    fig = new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    (x0_lo, x0_hi), (x1_lo, x1_hi) = input_ranges(data)
    g0, g1 = np.meshgrid(np.linspace(x0_lo, x0_hi, GRID_2D), np.linspace(x1_lo, x1_hi, GRID_2D), indexing="ij")
    logits = predict_grid(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data)
    if logits.ndim != 2 or logits.shape[0] != g0.size:
        raise ValueError(f"predict returned shape {tuple(logits.shape)}; expected [{g0.size}, classes] logits")
    num_classes = max(logits.shape[1], data.num_classes, 2)
    colors = class_colors(num_classes)
    classes = np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=1).reshape(g0.shape)
    # Regions as an image of cells, not contourf of the class index: contouring an index interpolates
    # between classes 0 and 2 through a false band of class 1. Each cell is centred on its grid point.
    half0, half1 = (x0_hi - x0_lo) / (2 * (GRID_2D - 1)), (x1_hi - x1_lo) / (2 * (GRID_2D - 1))
    ax.imshow(
        classes.T,  # imshow wants rows = x1, columns = x0
        origin="lower",
        extent=(x0_lo - half0, x0_hi + half0, x1_lo - half1, x1_hi + half1),
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(colors),
        vmin=-0.5,
        vmax=num_classes - 0.5,
        alpha=0.3,
    )
    # Boundary lines from the logits (sub-cell accurate): class k's region is where its logit beats the
    # best other one, so its edge is the zero level of that margin. With three or more classes each edge is
    # drawn from both sides, on the same line; with two, class 1's margin alone traces the whole boundary
    # (and a single logit has no rival: no edge).
    num_logits = logits.shape[1]
    for k in range(num_logits) if num_logits > 2 else range(1, num_logits):
        others = np.delete(logits, k, axis=1)
        with np.errstate(invalid="ignore"):  # inf - inf from a diverged model: NaN, left out below
            margin = (logits[:, k] - others.max(axis=1)).reshape(g0.shape)
        finite = margin[np.isfinite(margin)]
        if finite.size and finite.min() < 0 < finite.max():  # no sign change: no edge, and no warning
            ax.contour(g0, g1, margin, levels=[0.0], colors="black", linewidths=1.0)
    handles = []
    for (label, split, _), marker in zip(labelled_splits(data), "o^sDv", strict=False):
        x, y = subsample(split, point_budget(data, split))
        labels = y.reshape(-1).astype(int)
        point_colors = [colors[c] if 0 <= c < num_classes else "grey" for c in labels]
        ax.scatter(x[:, 0], x[:, 1], s=12, c=point_colors, marker=marker, edgecolors="black", linewidths=0.3)
        handles.append(Line2D([], [], linestyle="", marker=marker, color="grey", markeredgecolor="black", label=label))
    for c in range(num_classes):
        handles.append(Line2D([], [], linestyle="", marker="s", color=colors[c], label=f"class {c}"))
    ax.set_xlim(x0_lo, x0_hi)
    ax.set_ylim(x1_lo, x1_hi)
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    ax.set_title("Decision boundary: regions = predicted class, points = true class")
    # Below the axes: inside, it would hide points wherever it went.
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------------
# Building blocks, public because ``dtrain report`` draws the same pictures with plotly from them: the same
# grid, ranges, point sample and colours, so its interactive figures match these PNGs.


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot), laid out for legends
    placed outside the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Constrained layout: room for the legends placed outside the axes ("outside ..." locations).
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: renderable without pyplot or a display
    return fig


def _splits(data: DataSet) -> list[Split]:
    """The training split, then every validation split."""
    return [data.train, *data.val.values()]


def labelled_splits(data: DataSet) -> list[tuple[str, Split, str]]:
    """Each split with its legend label and colour: train, val, then the named extra splits (``outer``)."""
    out = [("train", data.train, "tab:blue")]
    extra_colors = iter(["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for name, split in data.val.items():
        if name == "":
            out.append(("val", split, "tab:orange"))
        else:
            out.append((f"val {name}", split, next(extra_colors, "tab:gray")))
    return out


def data_range(data: DataSet, part: Callable[[Split], torch.Tensor]) -> tuple[float, float]:
    """Smallest and largest finite value of ``part`` (e.g. ``lambda s: s.y``) over all splits; (-1, 1) if none."""
    values = torch.cat([part(s).detach().reshape(-1).cpu().double() for s in _splits(data)])
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return -1.0, 1.0
    return float(values.min()), float(values.max())


def padded(lo: float, hi: float, pad: float = PAD) -> tuple[float, float]:
    """``[lo, hi]`` widened by ``pad`` of its span on each side, so points on the edge are not cut by the frame."""
    span = hi - lo
    margin = pad * span if span > 0 else max(abs(lo), 1.0) * 0.5  # a constant column still gets a width
    return lo - margin, hi + margin


def input_ranges(data: DataSet) -> list[tuple[float, float]]:
    """Per input, its range over the training and all validation splits together, padded."""
    return [padded(*data_range(data, lambda s, i=i: s.x[:, i])) for i in range(data.num_inputs)]


def point_budget(data: DataSet, split: Split) -> int:
    """This split's share of MAX_POINTS, proportional to its size, so the mix of splits is kept."""
    total = sum(len(s) for s in _splits(data))
    return max(1, MAX_POINTS * len(split) // max(total, 1)) if total > MAX_POINTS else len(split)


def subsample(split: Split, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The split's points as float64 numpy, at most ``limit`` of them, evenly strided (deterministic)."""
    x = split.x.detach().cpu().double()
    y = split.y.detach().cpu()
    y = y.reshape(len(split), -1).double()
    if len(split) > limit:
        # The synthetic splits are already shuffled, so a stride is an unbiased sample; for a sorted file it
        # still covers the whole range, which a random pick would too but not reproducibly.
        idx = torch.linspace(0, len(split) - 1, limit).round().long()
        x, y = x[idx], y[idx]
    return x.numpy(), y.numpy()


def predict_grid(predict: Predict, grid: np.ndarray, data: DataSet) -> np.ndarray:
    """``predict`` over the points of ``grid`` [N, inputs] (in the data's dtype, without autograd), as float64."""
    inputs = torch.as_tensor(grid, dtype=data.train.x.dtype)
    with torch.no_grad():
        out = predict(inputs)
    return out.detach().cpu().double().numpy()


def predict_regression(predict: Predict, grid: np.ndarray, data: DataSet) -> np.ndarray:
    """:func:`predict_grid` for a one-output regression model, flattened to [N]; ValueError for another shape."""
    out = predict_grid(predict, grid, data)
    if out.size != grid.shape[0]:
        raise ValueError(f"predict returned shape {tuple(out.shape)}; expected [{grid.shape[0]}, 1] for regression")
    return out.reshape(-1)


def class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    """One RGBA colour per class: tab10 up to 10 classes, evenly spaced turbo beyond (tab10 would repeat)."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](c) for c in range(num_classes)]
    cmap = colormaps["turbo"]
    return [cmap(c / (num_classes - 1)) for c in range(num_classes)]


__all__ = [
    "DPI",
    "GRID_1D",
    "GRID_2D",
    "MAX_POINTS",
    "PAD",
    "Predict",
    "class_colors",
    "data_range",
    "figure_to_rgb",
    "input_ranges",
    "labelled_splits",
    "model_figures",
    "new_figure",
    "padded",
    "point_budget",
    "predict_grid",
    "predict_regression",
    "subsample",
]
