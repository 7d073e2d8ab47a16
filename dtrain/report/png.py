"""``--png``: the report's charts as static PNGs drawn with matplotlib (no browser, no kaleido): the curve
panels in one file, and each run's model figures (the pictures TensorBoard shows) in one file each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtrain.errors import UserError
from dtrain.report.panels import Panel, curve_panels, plottable, run_color
from dtrain.report.run_model import RunModel
from dtrain.report.runs import RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The panels' plotly dash names in matplotlib.
MPL_DASH = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
# The model figures' file name suffixes, by TensorBoard tag.
MODEL_TITLES = {
    "figures/surface": "surface",
    "figures/extrapolation": "extrapolation",
    "figures/decision_boundary": "decision_boundary",
}


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


def curves_png(runs: list[RunData], path: Path) -> None:
    """The curve panels as one PNG, two charts a row, one colour per run."""
    from matplotlib.lines import Line2D

    from dtrain.train.figures import new_figure

    panels = curve_panels(runs)
    rows = math.ceil(len(panels) / 2)
    fig = new_figure(12.0, 3.6 * rows + 0.4 * len(runs))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw_panel(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=run_color(i), label=r.label) for i, r in enumerate(runs)]
    one_row = sum(len(r.label) for r in runs) < 120  # else a row would run off the figure's edges
    fig.legend(handles=handles, loc="outside upper center", ncols=len(runs) if one_row else 1, fontsize="small")
    _save(fig, path)


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


def _draw_panel(ax: Axes, panel: Panel) -> None:
    for line in panel.lines:
        values = plottable(line.values, panel.log)
        color = run_color(line.run)
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
        color = run_color(run)
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


def _save(fig: Any, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
