"""``dtrain report RUN_DIR [RUN_DIR ...]``: one self-contained HTML report of finished (or stopped) runs.

The report overlays the runs' training curves (loss on a log scale, learning rate, gradient norms, update
ratios, and the coefficients' trajectories for the polynomial models) and shows each run's model over its
data (a 3-D surface, an extrapolation curve or a decision boundary), all interactive. plotly.js is inlined,
so the file opens offline, from a laptop or an e-mail attachment. ``--png`` draws the same charts as static
PNGs with matplotlib, for papers and terminals.

Everything comes from what a run directory holds (see ``dtrain/run.py``): the scalars from the TensorBoard
event files (read with TensorBoard's own reader), the labels from ``config.yaml``, the status from
``metrics.json``, and the model from ``config.yaml`` + ``model.pt``.

The parts, in the order the command uses them:

- :mod:`~dtrain.report.runs`: a run directory read into a :class:`RunData`;
- :mod:`~dtrain.report.labels`: runs named and labelled by the hyperparameters that differ between them;
- :mod:`~dtrain.report.run_model`: each run's model rebuilt from its config and weights;
- :mod:`~dtrain.report.panels`: what each curve chart shows, whatever draws it;
- :mod:`~dtrain.report.plotly_figures`: the interactive charts (curves and models);
- :mod:`~dtrain.report.page`: the HTML document;
- :mod:`~dtrain.report.png`: the ``--png`` files, with matplotlib;
- :mod:`~dtrain.report.cli`: the subcommand, :func:`main`.
"""

from __future__ import annotations

from dtrain.report.cli import main
from dtrain.report.labels import label_runs
from dtrain.report.page import build_html
from dtrain.report.panels import Line, Panel, curve_panels
from dtrain.report.plotly_figures import model_plot, panel_figure
from dtrain.report.run_model import RunModel, load_model
from dtrain.report.runs import RunData, Series, read_run

__all__ = [
    "Line",
    "Panel",
    "RunData",
    "RunModel",
    "Series",
    "build_html",
    "curve_panels",
    "label_runs",
    "load_model",
    "main",
    "model_plot",
    "panel_figure",
    "read_run",
]
