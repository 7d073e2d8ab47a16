"""The ``dtrain report`` subcommand: its arguments, and the order of the work (read and label the runs,
rebuild their models, write the HTML, then the PNGs), with every usage mistake a one-line ``UserError``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from dtrain.errors import UserError
from dtrain.report.labels import label_runs
from dtrain.report.page import build_html
from dtrain.report.png import curves_png, model_pngs, png_paths
from dtrain.report.run_model import load_model
from dtrain.report.runs import read_run


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
