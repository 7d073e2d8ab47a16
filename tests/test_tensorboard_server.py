"""A real TensorBoard server on loopback, serving the event files of a real 2-rank run: its HTTP data API
returns the scalars of metrics.json and the model's figure."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import Run, assert_ok, run_dtrain

pytestmark = pytest.mark.multiprocess
# --load_fast=false: tensorboard's own Python data loader (the Rust one is an optional extra)
TENSORBOARD = [sys.executable, "-m", "tensorboard.main", "--load_fast=false"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    overrides = ("trainer.max_epochs=30", "trainer.device=cpu", "trainer.figures=true")
    return assert_ok(run_dtrain(run_dir, *overrides, nproc=2))


@pytest.fixture(scope="module")
def server(two_rank_run: Run) -> Iterator[str]:
    """``http://127.0.0.1:PORT``: TensorBoard on a free port, ready once it has printed its address."""
    proc = subprocess.Popen(
        [*TENSORBOARD, "--logdir", str(two_rank_run.run_dir), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if " at http://127.0.0.1:" in line:
                yield line.split(" at ")[1].split("/ ")[0].rstrip("/")
                break
        else:
            pytest.fail(f"tensorboard exited ({proc.wait()}) without serving")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(base: str, path: str, **query: str) -> object:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_scalars_served_equal_metrics_json(server: str, two_rank_run: Run) -> None:
    assert get(server, "/data/runs") == ["."]  # one run: rank 0's event files only
    metrics = two_rank_run.metrics
    for tag in ("train/loss", "val/loss", "lr", "grad_norm/total", "param/c0"):
        series = get(server, "/data/plugin/scalars/scalars", run=".", tag=tag)
        _, step, value = series[-1]
        assert step == metrics["steps"] or tag == "val/loss"
        assert value == pytest.approx(metrics[tag], rel=1e-6), tag  # TensorBoard keeps float32


def test_the_model_figure_is_served_as_an_image(server: str, two_rank_run: Run) -> None:
    tags = get(server, "/data/plugin/images/tags")
    assert "figures/surface" in tags["."]
    images = get(server, "/data/plugin/images/images", run=".", tag="figures/surface")
    assert images and images[-1]["step"] == two_rank_run.metrics["steps"]
