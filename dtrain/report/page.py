"""The report as one self-contained HTML document: the runs and differences tables, the curve and model
figures (plotly, with plotly.js inlined so the file opens offline), and each run's config."""

from __future__ import annotations

import datetime
import html
from typing import TYPE_CHECKING, Any

from dtrain.report.panels import curve_panels, run_color
from dtrain.report.plotly_figures import model_plot, panel_figure
from dtrain.report.run_model import RunModel
from dtrain.report.runs import RunData

if TYPE_CHECKING:
    import plotly.graph_objects as go

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
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


def build_html(runs: list[RunData], models: list[RunModel]) -> str:
    """The whole report as one HTML document with plotly.js inlined (no network needed to open it)."""
    from plotly.offline import get_plotlyjs

    from dtrain import __version__

    curves = [_div(panel_figure(p, runs), 480) for p in curve_panels(runs)]
    model_cells = []
    for i, (run, model) in enumerate(zip(runs, models, strict=True)):
        heading = f'<h3><span class="swatch" style="background:{run_color(i)}"></span>'
        heading += f"{html.escape(run.label)}</h3>"
        fig = model_plot(model.predict, model.data) if model.predict is not None and model.data is not None else None
        if fig is not None:
            fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, template="plotly_white")
            body = _div(fig, 520)
        else:
            reason = "more than 2 inputs, or 1-input classification"
            if model.data is not None and not model.data.in_memory:
                reason = "its rows are read through a DataLoader, not held in memory"
            note = model.note or f"no model figure for this data ({reason})"
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
        "<h2>Data</h2>",
        "<ul>"
        + "".join(
            f"<li>{html.escape(r.name)}: {html.escape(str(r.metrics['data']))}</li>"
            for r in runs
            if r.metrics.get("data")
        )
        + "</ul>",
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


def runs_table(runs: list[RunData]) -> str:
    """One row per run: where it is, how it ended, its final metrics."""
    metric_keys = ["train/loss", *sorted({k for r in runs for k in r.metrics if k.startswith("val/")})]
    head = ["run", "directory", "status", "steps", *metric_keys, "wall time"]
    rows = []
    for i, run in enumerate(runs):
        swatch = f'<span class="swatch" style="background:{run_color(i)}"></span>'
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


def _div(fig: go.Figure, height: int) -> str:
    # plotly.js itself is inlined once in <head>; each figure only carries its data.
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOTLY_CONFIG, default_height=f"{height}px")


def _number(value: Any) -> str:
    """A metrics.json number for a table cell: "n/a" where it is missing, blank where it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else ""
    return f"{value:d}" if isinstance(value, int) else f"{value:.5g}"
