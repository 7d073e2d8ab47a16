"""The report's training-curve charts as data: which lines, axes, reference lines and marks each chart has,
independent of how it is drawn (plotly for the HTML, matplotlib for the PNGs), and the colour of each run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtrain.report.runs import RunData

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
# Line styles of the loss panel: the training loss solid, validation dashed, the extrapolation split dotted.
LOSS_STYLES = {"train/loss": "solid", "val/loss": "dash", "val/loss_outer": "dot"}


def run_color(index: int) -> str:
    """The CSS colour of the run at ``index`` (the palette repeats after ten runs)."""
    return RUN_COLORS[index % len(RUN_COLORS)]


@dataclass
class Line:
    """One curve of one run."""

    run: int  # index of the run: its colour
    tag: str  # the TensorBoard tag it shows
    steps: np.ndarray
    values: np.ndarray
    style: str = "solid"  # plotly's dash name: solid, dash, dot, dashdot
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
    panels += [_update_ratio_panel(runs), _param_panel(runs), *_metric_panels(runs)]
    return [p for p in panels if p.lines]


def plottable(values: np.ndarray, log: bool) -> np.ndarray:
    """Values with what cannot be drawn (non-finite; non-positive on a log axis) as NaN: a gap in the line."""
    out = np.asarray(values, dtype=float).copy()
    bad = ~np.isfinite(out) | (out <= 0 if log else False)
    out[bad] = np.nan
    return out


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
    from dtrain.train.figures import padded

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
            yrange = padded(float(finite.min()), float(finite.max()), pad=0.08)
    note = "dotted grey: the data's true coefficients" if references else ""
    if yrange is not None:
        note = (note + "; " if note else "") + "y range fitted to the runs that did not diverge (zoom out for all)"
    return Panel("param", "Parameter trajectories", "value", False, lines, list(references), yrange=yrange, note=note)


def _metric_panels(runs: list[RunData]) -> list[Panel]:
    """One chart per validation metric besides the loss (``val/accuracy``, ``val/f1``, a user's ``val/kappa``)."""
    tags = sorted({t for r in runs for t in r.scalars if t.startswith("val/") and not t.startswith("val/loss")})
    panels = []
    for tag in tags:
        name = tag.removeprefix("val/")
        lines = [Line(i, tag, r.scalars[tag].steps, r.scalars[tag].values) for i, r in _having(runs, tag)]
        panels.append(Panel(name, f"Validation {name}", name, False, lines))
    return panels


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
