"""``dtrain report RUN_DIR [RUN_DIR ...]``: one self-contained HTML report of finished (or stopped) runs.

The report overlays the runs' training curves (loss on a log scale, learning rate, gradient norms, update
ratios, and the coefficients' trajectories for the polynomial models) and shows each run's model over its
data (a 3-D surface, an extrapolation curve or a decision boundary), all interactive. plotly.js is inlined,
so the file opens offline, from a laptop or an e-mail attachment. ``--png`` draws the same charts as static
PNGs with matplotlib, for papers and terminals.

Everything comes from what a run directory holds (see ``dtrain/run.py``): the scalars from the TensorBoard
event files (read with TensorBoard's own reader), the labels from ``config.yaml``, the status from
``metrics.json``, and the model from ``config.yaml`` + ``model.pt``.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from dtrain.errors import UserError

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.axes import Axes

    from dtrain.data.dataset import DataSet

# One colour per run, the same in the HTML and the PNGs (matplotlib's tab10, which plotly's default echoes).
RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
# Config keys that change how a run is watched or stored, not what it learns: left out of the labels.
BOOKKEEPING = (
    "trainer.progress",
    "trainer.figures",
    "trainer.histogram_every",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.device",
    "resume",
    "dist.",
    "checkpoint.",
)
# Differences named in a run's legend label; the rest are in the report's table.
LABEL_DIFFERENCES = 3
EVENT_GLOB = "events.out.tfevents.*"
# Line styles of the loss panel: the training loss solid, validation dashed, the extrapolation split dotted.
LOSS_STYLES = {"train/loss": "solid", "val/loss": "dash", "val/loss_outer": "dot"}
# The same styles in matplotlib (plotly takes the names as they are).
MPL_DASH = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


# ---------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Series:
    """One scalar tag of one run: steps and values (non-finite values kept as they were logged)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunData:
    """What the report needs from one run directory."""

    path: Path
    name: str  # the directory's name (with its parent's where two runs share one)
    config: dict[str, Any]  # config.yaml as nested plain values
    config_text: str
    scalars: dict[str, Series]
    metrics: dict[str, Any]  # metrics.json; {} while a run is going on or after it was killed
    label: str = ""
    differences: dict[str, str] = field(default_factory=dict)  # this run's values of the differing keys

    @property
    def status(self) -> str:
        """``completed``, ``diverged``, ``preempted`` (from metrics.json), or ``unfinished`` without one."""
        return str(self.metrics.get("status", "unfinished"))

    @property
    def diverged_at(self) -> int | None:
        """The first logged step whose loss or gradient norm is not finite (the last step if the run says it
        diverged without one logged), else None."""
        steps = [
            int(series.steps[~np.isfinite(series.values)][0])
            for tag in ("train/loss", "grad_norm/total")
            if (series := self.scalars.get(tag)) is not None and not np.isfinite(series.values).all()
        ]
        if steps:
            return min(steps)
        if self.status == "diverged" and "train/loss" in self.scalars and len(self.scalars["train/loss"].steps):
            return int(self.scalars["train/loss"].steps[-1])
        return None


def read_run(path: Path) -> RunData:
    """Read one run directory, or raise :class:`UserError` saying why it is not one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give dtrain run directories (outputs/<date>/<time>-<id>)")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        nested = sorted({p.parent for p in [*path.glob("*/config.yaml"), *path.glob("*/*/config.yaml")]})
        hint = f"; the runs below it are e.g. {nested[0]}" if nested else ""
        raise UserError(f"{path} is not a dtrain run directory (no config.yaml){hint}")
    if not any(path.glob(EVENT_GLOB)):
        raise UserError(f"{path} has no TensorBoard event files ({EVENT_GLOB}): did the run start training?")
    try:
        config_text = config_file.read_text()
        config = OmegaConf.to_container(OmegaConf.create(config_text), resolve=False)
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as exc:
        raise UserError(f"cannot read {config_file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} does not hold a config mapping")
    scalars = read_scalars(path)
    if not scalars:
        raise UserError(f"{path}'s event files hold no training scalars: did the run log a step?")
    metrics: dict[str, Any] = {}
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {metrics_file}: {exc}") from None
    return RunData(path, path.name, config, config_text, scalars, metrics)


def read_scalars(path: Path) -> dict[str, Series]:
    """Every training scalar in the directory's event files, read with TensorBoard's own reader (which also
    drops the steps a resumed run logged again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Images and histograms are parsed anyway; keeping one of each instead of all saves memory.
    guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    accumulator = EventAccumulator(str(path), size_guidance=guidance)
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith("hparam/"):  # the final metrics again, for the HParams dashboard, at step 0
            continue
        events = accumulator.Scalars(tag)
        out[tag] = Series(
            np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=float)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Labels: the directory name and the hyperparameters that differ between the runs


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``, in the config's order."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_value(value: Any) -> str:
    """A config value as it would be written on the command line."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def label_runs(runs: list[RunData]) -> None:
    """Set each run's ``label`` and ``differences``: its directory name plus the hyperparameters that differ
    between the runs (bookkeeping such as logging cadence left out), so runs of two presets are told apart."""
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:  # outputs/a/run and outputs/b/run: say which
            run.name = f"{run.path.parent.name}/{run.path.name}"
    names = [r.name for r in runs]
    for i, run in enumerate(runs):
        if names.count(names[i]) > 1:  # the same directory twice, or a/b/run and c/b/run: number them
            run.name = f"{names[i]} #{names[: i + 1].count(names[i])}"
    flats = [flatten(r.config) for r in runs]
    differing = differing_keys(flats)
    short = short_keys(differing)
    for run, flat in zip(runs, flats, strict=True):
        run.differences = {k: format_value(flat[k]) if k in flat else "(unset)" for k in differing}
        shown = [f"{short[k]}={run.differences[k]}" for k in differing[:LABEL_DIFFERENCES]]
        if len(differing) > LABEL_DIFFERENCES:
            shown.append(f"+{len(differing) - LABEL_DIFFERENCES} more")
        run.label = f"{run.name} ({', '.join(shown)})" if shown else run.name


def differing_keys(flats: list[dict[str, Any]]) -> list[str]:
    """The flattened config keys whose values differ between the runs: which model, data, optimizer or schedule
    first (``model.name``...), then the rest in the config's order. Bookkeeping is left out, and so are the
    options of a group whose choice differs that only one choice has (``data.outer_low`` of sine against
    moons): ``data.name`` already says it."""
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    differing = [
        k
        for k in keys
        if not k.startswith(BOOKKEEPING) and len({format_value(f[k]) if k in f else "(unset)" for f in flats}) > 1
    ]
    chosen = {k.rsplit(".", 1)[0] for k in differing if k.endswith(".name")}
    differing = [
        k for k in differing if k.endswith(".name") or k.rsplit(".", 1)[0] not in chosen or all(k in f for f in flats)
    ]
    return sorted(differing, key=lambda k: not k.endswith(".name"))  # stable: config order within each part


def short_keys(keys: list[str]) -> dict[str, str]:
    """Legend-sized names: ``optim.lr`` -> ``lr``, ``schedule.name`` -> ``schedule``, the full key where the
    short one would be ambiguous."""
    short = {k: (k.split(".")[0] if k.endswith(".name") else k.split(".")[-1]) for k in keys}
    return {k: s if list(short.values()).count(s) == 1 else k for k, s in short.items()}


# ---------------------------------------------------------------------------------------------
# Curves: what each chart shows, independent of how it is drawn (plotly for HTML, matplotlib for PNG)


@dataclass
class Line:
    """One curve of one run."""

    run: int  # index of the run: its colour
    tag: str  # the TensorBoard tag it shows
    steps: np.ndarray
    values: np.ndarray
    style: str = "solid"
    width: float = 2.0
    opacity: float = 1.0
    group: str = ""  # lines of a run with one group ("grad_norm/*") share one legend entry
    show_legend: bool = True
    end_text: str = ""  # written at the line's last point (which coefficient a trajectory is)


@dataclass
class Panel:
    """One chart: its lines, axes, and marks."""

    key: str
    title: str
    ylabel: str
    log: bool
    lines: list[Line]
    references: list[tuple[float, str]] = field(default_factory=list)  # horizontal lines: (value, text)
    events: list[tuple[int, int, str]] = field(default_factory=list)  # vertical lines: (run, step, text)
    yrange: tuple[float, float] | None = None  # initial y range where autoscale would mislead
    note: str = ""


def curve_panels(runs: list[RunData]) -> list[Panel]:
    """The charts of the report, in order, each only where some run logged its tags."""
    panels = [_loss_panel(runs), _lr_panel(runs), _grad_norm_panel(runs)]
    panels += [_update_ratio_panel(runs), _param_panel(runs), _accuracy_panel(runs)]
    return [p for p in panels if p.lines]


def _loss_panel(runs: list[RunData]) -> Panel:
    lines = []
    for i, run in enumerate(runs):
        tags = [t for t in run.scalars if t == "train/loss" or t.startswith("val/loss")]
        for tag in sorted(tags, key=lambda t: (t != "train/loss", t)):
            s = run.scalars[tag]
            lines.append(Line(i, tag, s.steps, s.values, style=LOSS_STYLES.get(tag, "dashdot")))
    events = [(i, step, f"{run.name} diverged") for i, run in enumerate(runs) if (step := run.diverged_at) is not None]
    styles = {"solid": "solid", "dash": "dashed", "dot": "dotted", "dashdot": "dash-dotted"}
    shown = dict.fromkeys(line.tag for line in lines)
    note = ", ".join(f"{styles[LOSS_STYLES.get(tag, 'dashdot')]}: {tag}" for tag in shown) if len(shown) > 1 else ""
    return Panel("loss", "Loss", "loss (log scale)", True, lines, events=events, note=note)


def _lr_panel(runs: list[RunData]) -> Panel:
    lines = [Line(i, "lr", r.scalars["lr"].steps, r.scalars["lr"].values) for i, r in _having(runs, "lr")]
    return Panel("lr", "Learning rate", "lr", False, lines)


def _grad_norm_panel(runs: list[RunData]) -> Panel:
    lines = []
    for i, run in enumerate(runs):
        if (s := run.scalars.get("grad_norm/total")) is not None:
            lines.append(Line(i, "grad_norm/total", s.steps, s.values))
        lines += _per_parameter(i, run, "grad_norm/", exclude="grad_norm/total")
    note = "thick: the total norm; thin: per parameter (before clipping)"
    return Panel("grad_norm", "Gradient norms", "norm (log scale)", True, lines, note=note)


def _update_ratio_panel(runs: list[RunData]) -> Panel:
    lines = [line for i, run in enumerate(runs) for line in _per_parameter(i, run, "update_ratio/", thin=False)]
    note = "||Δp|| / ||p|| of each step, per parameter"
    return Panel("update_ratio", "Update / weight ratio", "ratio (log scale)", True, lines, note=note)


def _param_panel(runs: list[RunData]) -> Panel:
    """The coefficients' trajectories (models made of scalars log ``param/<name>``), with the true values of
    the original example's surface where a run fitted it with the matching polynomial."""
    lines = []
    references: dict[tuple[float, str], None] = {}
    for i, run in enumerate(runs):
        tags = sorted(t for t in run.scalars if t.startswith("param/"))
        for n, tag in enumerate(tags):
            s = run.scalars[tag]
            end_text = tag.removeprefix("param/")
            lines.append(Line(i, tag, s.steps, s.values, group="param/*", show_legend=n == 0, end_text=end_text))
        for value, text in true_coefficients(run.config):
            references[(value, text)] = None
    # A diverged run's coefficients reach 1e17 and would flatten everyone else's: start zoomed on the others.
    calm = [line for line in lines if runs[line.run].diverged_at is None]
    yrange = None
    if calm and len(calm) < len(lines):
        finite = np.concatenate([line.values[np.isfinite(line.values)] for line in calm])
        finite = np.concatenate([finite, [v for v, _ in references]])
        if finite.size:
            yrange = _padded_range(float(finite.min()), float(finite.max()))
    note = "dotted grey: the data's true coefficients" if references else ""
    if yrange is not None:
        note = (note + "; " if note else "") + "y range fitted to the runs that did not diverge (zoom out for all)"
    return Panel("param", "Parameter trajectories", "value", False, lines, list(references), yrange=yrange, note=note)


def _accuracy_panel(runs: list[RunData]) -> Panel:
    lines = [
        Line(i, "val/accuracy", r.scalars["val/accuracy"].steps, r.scalars["val/accuracy"].values)
        for i, r in _having(runs, "val/accuracy")
    ]
    return Panel("accuracy", "Validation accuracy", "accuracy", False, lines)


def _having(runs: list[RunData], tag: str) -> list[tuple[int, RunData]]:
    return [(i, r) for i, r in enumerate(runs) if tag in r.scalars]


def _per_parameter(i: int, run: RunData, prefix: str, exclude: str = "", thin: bool = True) -> list[Line]:
    """One line per parameter, all under one legend entry per run (clicking it shows or hides them all)."""
    tags = sorted(t for t in run.scalars if t.startswith(prefix) and t != exclude)
    return [
        Line(
            i,
            tag,
            run.scalars[tag].steps,
            run.scalars[tag].values,
            width=1.0 if thin else 1.5,
            opacity=0.5 if thin else 0.85,
            group=f"{prefix}*",
            show_legend=n == 0,
        )
        for n, tag in enumerate(tags)
    ]


def true_coefficients(config: dict[str, Any]) -> list[tuple[float, str]]:
    """``(value, "c0 true")`` pairs where the run fitted ``data=poly2d`` with the degree-2 polynomial, whose
    coefficients c0..c4 are the data's coefficients in the same order (see dtrain/models/polynomial.py)."""
    model, data = config.get("model") or {}, config.get("data") or {}
    polynomial = model.get("name") == "polynomial" or (
        model.get("name") == "graph" and model.get("graph") == "polynomial"
    )
    if not (polynomial and model.get("degree") == 2 and data.get("name") == "poly2d"):
        return []
    return [(float(v), f"c{k} true") for k, v in enumerate(data.get("coefficients") or [])]


def _padded_range(lo: float, hi: float, pad: float = 0.08) -> tuple[float, float]:
    margin = (hi - lo) * pad if hi > lo else max(abs(lo), 1.0) * 0.5
    return lo - margin, hi + margin


def plottable(values: np.ndarray, log: bool) -> np.ndarray:
    """Values with what cannot be drawn (non-finite; non-positive on a log axis) as NaN: a gap in the line."""
    out = np.asarray(values, dtype=float).copy()
    bad = ~np.isfinite(out) | (out <= 0 if log else False)
    out[bad] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# The model of each run, rebuilt from config.yaml + model.pt


@dataclass
class RunModel:
    """A run's trained model and its data, or the reason there is none to show."""

    predict: Any = None  # Callable[[torch.Tensor], torch.Tensor] | None
    data: DataSet | None = None
    note: str = ""


def load_model(run: RunData) -> RunModel:
    """Rebuild the run's model from its config and trained weights; a reason instead where that cannot be."""
    weights = run.path / "model.pt"
    if not weights.is_file():
        reasons = {
            "diverged": "the run diverged (non-finite loss or gradient), so it saved no model.pt",
            "preempted": "the run was stopped before it finished, so it saved no model.pt yet "
            "(run the same command again to resume it from checkpoints/)",
        }
        return RunModel(note=reasons.get(run.status, "no model.pt: the run has not finished, or it was killed"))
    import torch
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dtrain.config import load
    from dtrain.data import build_dataset
    from dtrain.models import build_model

    try:
        config = load(OmegaConf.create(run.config))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # The weights' own precision (float64 runs save float64): the data and the grid follow it.
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        data = build_dataset(config.data, config.seed).to(torch.device("cpu"), dtype)
        model = build_model(config.model, data).to(dtype)
        model.load_state_dict(state)
    except (UserError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunModel(note=f"the model could not be rebuilt from config.yaml and model.pt: {first}")
    except OmegaConfBaseException as exc:
        return RunModel(note=f"config.yaml could not be loaded: {str(exc).splitlines()[0]}")
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return RunModel(predict=predict, data=data)


def model_plot(predict: Any, data: DataSet) -> go.Figure | None:
    """The interactive counterpart of :func:`dtrain.train.figures.model_figures`: a 3-D surface with the points
    (2-input regression), the prediction against the points with the training range shaded (1-input
    regression), or the decision regions and boundary under the points (2-input classification); None where
    no picture is meaningful."""
    if len(data.train) == 0:
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

    from dtrain.train import figures as F

    (x0_lo, x0_hi), (x1_lo, x1_hi) = F._ranges(data)
    a0, a1 = np.linspace(x0_lo, x0_hi, F.GRID_2D), np.linspace(x1_lo, x1_hi, F.GRID_2D)
    g0, g1 = np.meshgrid(a0, a1, indexing="ij")
    z = F._predict_regression(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data).reshape(g0.shape)
    fig = go.Figure()
    # plotly's surface has z[row = y index][column = x index]: the transpose of our (x0, x1) grid.
    fig.add_trace(
        go.Surface(
            x=a0, y=a1, z=plottable(z, False).T, colorscale="Viridis", opacity=0.7, showscale=False, name="model"
        )
    )
    for label, split, color in F._labelled_splits(data):
        x, y = F._points(split, F._budget(data, split))
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

    from dtrain.train import figures as F

    ((lo, hi),) = F._ranges(data)
    grid = np.linspace(lo, hi, F.GRID_1D)
    prediction = F._predict_regression(predict, grid[:, None], data)
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
    for label, split, color in F._labelled_splits(data):
        x, y = F._points(split, F._budget(data, split))
        fig.add_trace(
            go.Scatter(x=x[:, 0], y=y[:, 0], mode="markers", marker={"size": 4, "color": _hex(color)}, name=label)
        )
    fig.add_trace(go.Scatter(x=grid, y=plottable(prediction, False), line={"color": "black"}, name="prediction"))
    # Pinned to the data, as in the PNG: an extrapolating polynomial's huge values would flatten the points.
    y_lo, y_hi = F._padded(*F._data_range(data, lambda s: s.y), pad=0.15)
    fig.update_layout(xaxis={"title": "x", "range": [lo, hi]}, yaxis={"title": "y", "range": [y_lo, y_hi]})
    return fig


def _decision_plot(predict: Any, data: DataSet) -> go.Figure:
    import plotly.graph_objects as go

    from dtrain.train import figures as F

    (x0_lo, x0_hi), (x1_lo, x1_hi) = F._ranges(data)
    a0, a1 = np.linspace(x0_lo, x0_hi, F.GRID_2D), np.linspace(x1_lo, x1_hi, F.GRID_2D)
    g0, g1 = np.meshgrid(a0, a1, indexing="ij")
    logits = F._predict(predict, np.stack([g0.ravel(), g1.ravel()], axis=1), data)
    num_classes = max(logits.shape[1], data.num_classes, 2)
    colors = [_hex(c) for c in F._class_colors(num_classes)]
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
    for (label, split, _), symbol in zip(F._labelled_splits(data), ("circle", "triangle-up", "square"), strict=False):
        x, y = F._points(split, F._budget(data, split))
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


MODEL_TITLES = {
    "figures/surface": "surface",
    "figures/extrapolation": "extrapolation",
    "figures/decision_boundary": "decision_boundary",
}


# ---------------------------------------------------------------------------------------------
# HTML


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
                line={"color": RUN_COLORS[line.run % len(RUN_COLORS)], "dash": line.style},
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
        color = RUN_COLORS[index % len(RUN_COLORS)]
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


def _div(fig: go.Figure, height: int) -> str:
    # plotly.js itself is inlined once in <head>; each figure only carries its data.
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOTLY_CONFIG, default_height=f"{height}px")


def build_html(runs: list[RunData], models: list[RunModel]) -> str:
    """The whole report as one HTML document with plotly.js inlined (no network needed to open it)."""
    from plotly.offline import get_plotlyjs

    from dtrain import __version__

    curves = [_div(panel_figure(p, runs), 480) for p in curve_panels(runs)]
    model_cells = []
    for i, (run, model) in enumerate(zip(runs, models, strict=True)):
        heading = f'<h3><span class="swatch" style="background:{RUN_COLORS[i % len(RUN_COLORS)]}"></span>'
        heading += f"{html.escape(run.label)}</h3>"
        fig = model_plot(model.predict, model.data) if model.predict is not None and model.data is not None else None
        if fig is not None:
            fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, template="plotly_white")
            body = _div(fig, 520)
        else:
            note = model.note or "no model figure for this data (more than 2 inputs, or 1-input classification)"
            body = f'<p class="note">No model figure: {html.escape(note)}.</p>'
        model_cells.append(f'<div class="cell">{heading}{body}</div>')
    title = "dtrain report: " + ", ".join(r.name for r in runs)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Generated {generated} by dtrain {__version__}. Interactive: hover for values, drag to '
        "zoom, double-click to reset, click a legend entry to hide or show it.</p>",
        "<h2>Runs</h2>",
        runs_table(runs),
        differences_table(runs),
        "<h2>Training curves</h2>",
        '<div class="grid">' + "".join(f'<div class="cell">{c}</div>' for c in curves) + "</div>",
        "<h2>Models</h2>",
        '<div class="grid">' + "".join(model_cells) + "</div>",
        "<h2>Configs</h2>",
        *(
            f"<details><summary>{html.escape(r.name)}: {html.escape(str(r.path / 'config.yaml'))}</summary>"
            f"<pre>{html.escape(r.config_text)}</pre></details>"
            for r in runs
        ),
        # Each figure is drawn while the page is still being laid out: fit them to their final cells.
        "<script>window.addEventListener('load', () => "
        "document.querySelectorAll('.js-plotly-plot').forEach((el) => Plotly.Plots.resize(el)));</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { font-size: 1em; margin: 0.3em 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
.cell { border: 1px solid #eee; padding: 0.4em; min-width: 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
.note { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.85em; }
"""


def runs_table(runs: list[RunData]) -> str:
    """One row per run: where it is, how it ended, its final metrics."""
    metric_keys = ["train/loss", *sorted({k for r in runs for k in r.metrics if k.startswith("val/")})]
    head = ["run", "directory", "status", "steps", *metric_keys, "wall time"]
    rows = []
    for i, run in enumerate(runs):
        swatch = f'<span class="swatch" style="background:{RUN_COLORS[i % len(RUN_COLORS)]}"></span>'
        cells = [swatch + html.escape(run.label), html.escape(str(run.path)), html.escape(run.status)]
        cells.append(_number(run.metrics.get("steps")))
        cells += [_number(run.metrics.get(k)) for k in metric_keys]
        wall = run.metrics.get("wall_time_s")
        cells.append(f"{wall:.1f} s" if isinstance(wall, (int, float)) else "")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def differences_table(runs: list[RunData]) -> str:
    """The hyperparameters that differ between the runs, side by side (empty for one run)."""
    if len(runs) < 2 or not runs[0].differences:
        return ""
    header = "<tr><th>differs</th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"
    rows = [
        f"<tr><td>{html.escape(key)}</td>" + "".join(f"<td>{html.escape(r.differences[key])}</td>" for r in runs)
        for key in runs[0].differences
    ]
    return f"<h3>Hyperparameters that differ</h3><table>{header}{'</tr>'.join(rows)}</tr></table>"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else ""
    return f"{value:d}" if isinstance(value, int) else f"{value:.5g}"


# ---------------------------------------------------------------------------------------------
# PNG (matplotlib: no browser, no kaleido)


def curves_png(runs: list[RunData], path: Path) -> None:
    """The curve panels as one PNG, two charts a row, one colour per run."""
    from matplotlib.lines import Line2D

    from dtrain.train.figures import _new_figure

    panels = curve_panels(runs)
    rows = math.ceil(len(panels) / 2)
    fig = _new_figure(12.0, 3.6 * rows + 0.4 * len(runs))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], label=r.label) for i, r in enumerate(runs)]
    one_row = sum(len(r.label) for r in runs) < 120  # else a row would run off the figure's edges
    fig.legend(handles=handles, loc="outside upper center", ncols=len(runs) if one_row else 1, fontsize="small")
    _save(fig, path)


def _draw_panel(ax: Axes, panel: Panel) -> None:
    for line in panel.lines:
        values = plottable(line.values, panel.log)
        color = RUN_COLORS[line.run % len(RUN_COLORS)]
        style = MPL_DASH[line.style]
        ax.plot(line.steps, values, style, color=color, linewidth=line.width * 0.75, alpha=line.opacity)
        if line.end_text and np.isfinite(values).any():
            last = int(np.flatnonzero(np.isfinite(values))[-1])
            ax.annotate(line.end_text, (line.steps[last], values[last]), fontsize="x-small", color=color)
    for value, text in panel.references:
        ax.axhline(value, color="grey", linestyle=":", linewidth=0.8)
        # On the left: the trajectories' own names sit at their right ends.
        ax.annotate(
            text, (0.01, value), xycoords=("axes fraction", "data"), fontsize="xx-small", color="grey", va="bottom"
        )
    for run, step, text in panel.events:
        color = RUN_COLORS[run % len(RUN_COLORS)]
        ax.axvline(step, color=color, linestyle=":", linewidth=1.0)
        ax.annotate(text, (step, 0.95), xycoords=("data", "axes fraction"), fontsize="x-small", color=color, ha="right")
    if panel.log:
        ax.set_yscale("log")
    if panel.yrange is not None:
        ax.set_ylim(*panel.yrange)
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.note:
        ax.text(0.0, -0.22, panel.note, transform=ax.transAxes, fontsize="x-small", color="#555")


def model_pngs(runs: list[RunData], models: list[RunModel], stem: Path) -> list[Path]:
    """Each run's model figures (the same pictures TensorBoard shows) as ``<stem>-<run>-<figure>.png``."""
    from dtrain.train.figures import model_figures

    written = []
    for run, model in zip(runs, models, strict=True):
        if model.predict is None or model.data is None:
            continue
        for tag, fig in model_figures(model.predict, model.data).items():
            fig.suptitle(run.label, fontsize="small")
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)
            path = stem.with_name(f"{stem.name}-{safe}-{MODEL_TITLES.get(tag, tag.split('/')[-1])}.png")
            _save(fig, path)
            written.append(path)
    return written


def _save(fig: Any, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def png_paths(target: Path) -> tuple[Path, Path]:
    """``--png`` as (curves file, stem of the model files): ``X.png`` -> X.png and X-<run>-<figure>.png beside
    it; a directory (existing, or a name without .png) -> DIR/curves.png and DIR/model-<run>-<figure>.png."""
    if target.suffix.lower() == ".png" and not target.is_dir():
        directory, curves, stem = target.parent, target, target.with_suffix("")
    else:
        directory, curves, stem = target, target / "curves.png", target / "model"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {directory}: {exc.strerror or exc}") from None
    return curves, stem


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ``UserError``s (exit 2 via dtrain's handler), not usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: list[str]) -> int:
    """``dtrain report RUN_DIR [RUN_DIR ...] [--out PATH] [--png PATH_OR_DIR]``; returns the exit status."""
    parser = _Parser(
        prog="dtrain report",
        description="Write one self-contained HTML report (offline: plotly.js inlined) of one or more dtrain runs, "
        "their curves overlaid; --png also draws PNGs with matplotlib.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to overlay")
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="the HTML file to write (default: report.html in the first run)"
    )
    parser.add_argument(
        "--png", type=Path, metavar="PATH_OR_DIR", help="also write PNGs: FILE.png (+ FILE-<run>-<figure>.png) or DIR/"
    )
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.run_dirs]
    label_runs(runs)
    models = [load_model(run) for run in runs]
    pngs = png_paths(args.png) if args.png is not None else None  # a bad --png fails before anything is written
    out = args.out or args.run_dirs[0] / "report.html"
    if out.is_dir():
        out = out / "report.html"
    try:
        out.write_text(build_html(runs, models), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"report: {out}")
    if pngs is not None:
        curves, stem = pngs
        curves_png(runs, curves)
        for path in [curves, *model_pngs(runs, models, stem)]:
            print(f"png: {path}")
    for run, model in zip(runs, models, strict=True):
        if model.note:
            print(f"note: {run.name}: no model figure: {model.note}")
    return 0
