"""What TensorBoard shows besides the loss: the custom-scalars layout, clipping, update ratios, parameter
values, histograms; and the end-of-run summary table. Read back with tensorboard's own event reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from tests.conftest import Run, assert_ok, run_dtrain
from tests.tb import scalars

POLY = ("trainer.max_epochs=6", "trainer.log_every=1", "trainer.precision=float64")


@pytest.fixture(scope="module")
def clipped(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Every step clipped (a tiny max norm), histograms every 3 steps."""
    run_dir = tmp_path_factory.mktemp("clipped") / "run"
    return assert_ok(run_dtrain(run_dir, *POLY, "trainer.clip_grad_norm=1e-6", "trainer.histogram_every=3"))


@pytest.fixture(scope="module")
def unclipped(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """No step clipped (a huge max norm), no histograms (the default)."""
    return assert_ok(run_dtrain(tmp_path_factory.mktemp("unclipped") / "run", *POLY, "trainer.clip_grad_norm=1e6"))


def accumulator(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_custom_scalars_layout_groups_the_charts(clipped: Run) -> None:
    acc = accumulator(clipped.run_dir)
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["loss (train and validation)"] == ["train/loss", "val/loss.*"]
    assert charts["gradient norms (total and per parameter)"] == ["grad_norm/.*"]
    assert charts["fraction of steps clipped"] == ["train/clipped_fraction"]
    assert charts["parameter values"] == ["param/.*"]  # a polynomial: its coefficients are worth watching
    assert "GPU memory (GB)" not in charts  # a CPU run


def test_clipped_fraction_counts_the_clipped_steps(clipped: Run, unclipped: Run) -> None:
    assert [v for _, v in scalars(clipped.run_dir)["train/clipped_fraction"]] == [1.0] * 6
    assert [v for _, v in scalars(unclipped.run_dir)["train/clipped_fraction"]] == [0.0] * 6


def test_update_ratio_and_parameter_values_agree(unclipped: Run) -> None:
    """update_ratio/c0 at step k is |c0(k) - c0(k-1)| / |c0(k-1)|, from the logged parameter values."""
    tags = scalars(unclipped.run_dir)
    values = [v for _, v in tags["param/c0"]]
    ratios = [v for _, v in tags["update_ratio/c0"]]
    for k in range(1, len(values)):
        assert ratios[k] == pytest.approx(abs(values[k] - values[k - 1]) / abs(values[k - 1]), rel=1e-4)
    steps = [s for s, _ in tags["perf/step_time_ms"]]
    assert steps == list(range(1, 7)) and all(v > 0 for _, v in tags["perf/step_time_ms"])


def test_histograms_only_when_asked(clipped: Run, unclipped: Run) -> None:
    assert accumulator(unclipped.run_dir).Tags()["histograms"] == []
    acc = accumulator(clipped.run_dir)
    assert {"weights/c0", "grads/c0"} <= set(acc.Tags()["histograms"])
    assert [e.step for e in acc.Histograms("weights/c0")] == [3, 6]


def test_the_run_ends_with_a_summary_table(unclipped: Run) -> None:
    table = unclipped.stdout[unclipped.stdout.index("done: completed, 6 steps") :]
    rows = dict(line.split(None, 1) for line in table.splitlines()[1:] if line.startswith("  ") and "/" in line[:14])
    assert math.isclose(float(rows["train/loss"]), unclipped.metrics["train/loss"], rel_tol=1e-5)
    assert f"tensorboard --logdir {unclipped.run_dir}" in table and f"dtrain report {unclipped.run_dir}" in table
