"""``dtrain report``: real runs in, one offline HTML (and PNGs) out, checked as text and in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain import report
from dtrain.data import build_dataset
from dtrain.errors import UserError
from tests.conftest import Run, assert_ok, launch, run_dtrain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Short versions of the presets: enough logged steps for curves, the model still on disk.
SHORT = ("trainer.max_epochs=30", "trainer.figures=false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """seed_good and seed_bad (short) and a diverging run, trained through the CLI (in this process)."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {
        "seed_good": ("experiment=seed_good", *SHORT),
        "seed_bad": ("experiment=seed_bad", *SHORT),
        "diverge": ("experiment=diverge", "trainer.figures=false"),
    }
    done = {name: run_dtrain(root / name, *args) for name, args in jobs.items()}
    assert_ok(done["seed_good"])
    assert_ok(done["seed_bad"])
    assert done["diverge"].returncode == 3, done["diverge"].stderr
    return done


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``dtrain report seed_good seed_bad diverge --out ... --png DIR``, once for the module."""
    out = tmp_path_factory.mktemp("report")
    dirs = [str(runs[name].run_dir) for name in ("seed_good", "seed_bad", "diverge")]
    proc = launch("report", *dirs, "--out", str(out / "report.html"), "--png", str(out / "png"))
    assert proc.returncode == 0, proc.stderr
    return out / "report.html", out / "png", proc


def distinct_colours(pixels: np.ndarray) -> int:
    """How many different RGB colours an image (floats in [0, 1] or uint8, as imread gives) holds."""
    rgb = pixels[..., :3]
    rgb = (rgb * 255).round().astype(np.int64) if rgb.dtype.kind == "f" else rgb.astype(np.int64)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


def trace_names(text: str) -> set[str]:
    """Every ``"name": ...`` in the figures' JSON, decoded (plotly writes ``/`` as ``\\u002f``)."""
    return {json.loads(f'"{m}"') for m in re.findall(r'"name":\s*"((?:[^"\\]|\\.)*)"', text)}


def test_report_overlays_the_runs_in_one_offline_html(built) -> None:
    path, _, proc = built
    text = path.read_text(encoding="utf-8")
    assert f"report: {path}" in proc.stdout
    # Self-contained: plotly.js inlined, nothing fetched.
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']https?://", text, re.IGNORECASE)
    assert len(text) > 1_000_000 and "Plotly.newPlot" in text
    # Each run labelled by its directory and the hyperparameters that differ.
    assert "seed_good (schedule=exp_decay, lr=0.01, interval=epoch, +3 more)" in text
    assert "diverge (schedule=constant, lr=0.2, interval=step, +3 more)" in text
    assert "<td>optim.lr</td><td>0.01</td><td>0.1</td><td>0.2</td>" in text
    names = trace_names(text)
    for run in ("seed_good", "seed_bad", "diverge"):
        for tag in ("train/loss", "lr", "grad_norm/total", "grad_norm/*", "update_ratio/*", "param/*"):
            assert f"{run} · {tag}" in names
    assert {"train", "model"} <= names  # the 3-D model figures: the data points and the surface
    assert "No model figure: the run diverged" in text
    assert "diverge diverged" in text  # the divergence marked on the loss chart


def test_png_output_is_valid_images(built) -> None:
    from matplotlib.image import imread

    _, directory, proc = built
    files = sorted(directory.glob("*.png"))
    assert [f.name for f in files] == ["curves.png", "model-seed_bad-surface.png", "model-seed_good-surface.png"]
    for f in files:
        assert f"png: {f}" in proc.stdout
        assert f.read_bytes()[:8] == PNG_MAGIC
        pixels = imread(f)
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
        assert distinct_colours(pixels) > 50  # drawn, not blank


def test_one_run_writes_report_html_into_its_directory(runs, capsys) -> None:
    run_dir = runs["seed_good"].run_dir
    assert report.main([str(run_dir), "--png", str(run_dir / "fig.png")]) == 0
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "seed_good · train/loss" in trace_names(text)
    assert "Hyperparameters that differ" not in text  # nothing to compare with
    # What the run trained on, as its start-up summary said it.
    assert "<h2>Data</h2>" in text and "<li>seed_good: data: poly2d (generated): 900 train / 0 val rows" in text
    assert (run_dir / "fig.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "fig-seed_good-surface.png").is_file()
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out


def test_seed_good_and_seed_bad_are_told_apart_by_what_differs(runs) -> None:
    data = [report.read_run(runs[name].run_dir) for name in ("seed_good", "seed_bad")]
    report.label_runs(data)
    assert [r.label for r in data] == [
        "seed_good (schedule=exp_decay, lr=0.01, interval=epoch, +2 more)",
        "seed_bad (schedule=constant, lr=0.1, interval=step, +2 more)",
    ]
    assert data[1].differences == {
        "schedule.name": "constant",
        "optim.lr": "0.1",
        "schedule.interval": "step",
        "schedule.min_lr": "0",
        "trainer.clip_grad_value": "1e+10",
    }


def test_param_chart_shows_the_true_coefficients_and_skips_the_diverged_scale(runs) -> None:
    data = [report.read_run(runs[name].run_dir) for name in ("seed_good", "diverge")]
    report.label_runs(data)
    (panel,) = [p for p in report.curve_panels(data) if p.key == "param"]
    assert [text for _, text in panel.references] == [f"c{k} true" for k in range(5)]
    assert panel.yrange is not None and panel.yrange[1] < 10  # the diverged run's 1e17 would hide the rest
    assert data[1].diverged_at is not None and data[0].diverged_at is None


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "is not a dtrain run directory (no config.yaml)"),
        (lambda d: (d / "config.yaml").write_text("seed: 0\n"), "has no TensorBoard event files"),
    ],
    ids=["not-a-run", "no-event-files"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, message) -> None:
    setup(tmp_path)
    proc = launch("report", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: ") and message in lines[0], proc.stderr


def test_other_mistakes_are_user_errors(tmp_path, runs) -> None:
    with pytest.raises(UserError, match="does not exist"):
        report.main([str(tmp_path / "missing")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        report.main([str(tmp_path / "file")])
    with pytest.raises(UserError, match="the following arguments are required: RUN_DIR"):
        report.main([])
    nested = tmp_path / "outputs"
    shutil.copytree(runs["seed_bad"].run_dir, nested / "day" / "run")
    with pytest.raises(UserError, match="the runs below it are"):
        report.main([str(nested)])


def test_a_model_that_cannot_be_rebuilt_is_a_note_not_a_failure(tmp_path, runs) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(runs["seed_bad"].run_dir, copy)
    (copy / "model.pt").write_bytes(b"not a state dict")
    model = report.load_model(report.read_run(copy))
    assert model.predict is None and "could not be rebuilt from config.yaml and model.pt" in model.note
    assert report.load_model(report.read_run(runs["diverge"].run_dir)).note.startswith("the run diverged")


def test_model_plots_for_curves_and_classes() -> None:
    from dtrain import config as C

    sine = build_dataset(C.SineConfig(num_points=200), seed=0)
    fig = report.model_plot(lambda x: torch.sin(x), sine)
    assert [t.type for t in fig.data] == ["scatter"] * 4  # train, val, val outer, prediction
    assert fig.layout.shapes[0].type == "rect"  # the training range, shaded
    moons = build_dataset(C.MoonsConfig(num_points=200), seed=0)
    fig = report.model_plot(lambda x: torch.stack([-x[:, 0], x[:, 0]], dim=1), moons)
    assert [t.type for t in fig.data][:2] == ["heatmap", "contour"]
    poly2d = build_dataset(C.Poly2dConfig(grid_size=3), seed=0)
    assert report.model_plot(lambda x: x.sum(dim=1, keepdim=True), poly2d).data[0].type == "surface"


# ---------------------------------------------------------------------------------------------
# In a real browser


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium_offline(request, tmp_path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    path, _, _ = request.getfixturevalue("built")  # only now: a skip should not wait for the training runs
    shot = tmp_path / "shot.png"
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        "--enable-unsafe-swiftshader",  # software WebGL for the 3-D surfaces
        "--proxy-server=127.0.0.1:9",  # the network is off: any request would fail and be logged
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1400,3200",
        f"--screenshot={shot}",
        "--dump-dom",
        path.resolve().as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line], "\n".join(console)
    # plotly.js ran with the network off (so it came from the file) and drew every chart: it marks each
    # figure's div as a plot and fills it with its SVG layers.
    figures = path.read_text(encoding="utf-8").count('class="plotly-graph-div"')
    assert figures == 7  # 5 curve charts (loss, lr, gradient norms, update ratios, parameters) + 2 models
    assert len(re.findall(r'class="plotly-graph-div js-plotly-plot"', proc.stdout)) == figures, proc.stderr[-3000:]
    assert proc.stdout.count('class="main-svg"') >= 2 * figures
    from matplotlib.image import imread

    assert shot.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(shot)
    assert pixels.shape[:2] == (3200, 1400)
    assert distinct_colours(pixels) > 500  # curves, surfaces, text: far from blank
