"""examples/digits, a user's own project, end to end as CI runs it: its run.sh exports the data, trains the
project's CNN with its own loss and config options (found through hydra.searchpath) on 2 gloo ranks, and
predicts the held-out digits with ``dtrain predict``. test_deploy.py lints run.sh."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, cli_env

EXAMPLE = REPO / "examples" / "digits"
RUN_SH = EXAMPLE / "run.sh"
# run.sh trains 5 epochs: measured val/accuracy 0.959-0.972 and held-out accuracy 0.905-0.93 over seeds 0-3.
MIN_VAL_ACCURACY = 0.85
MIN_HELD_OUT_ACCURACY = 0.8


@pytest.mark.multiprocess
def test_digits_example_trains_on_two_ranks_and_predicts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**cli_env(), "PYTHON": sys.executable}
    start = time.monotonic()
    # From a directory of its own, as a user would: nothing may depend on the working directory.
    proc = subprocess.run(
        ["bash", str(RUN_SH), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    elapsed = time.monotonic() - start
    output = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"

    run_dir = out / "run"
    # The project's own options were used, with the data's sizes filled in.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["_target_"] == "digits_example.model.DigitsCNN"
    assert config["loss"] == {"_target_": "digits_example.loss.smoothed_cross_entropy", "smoothing": 0.1}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["world_size"] == 2
    assert metrics["val/accuracy"] > MIN_VAL_ACCURACY, metrics
    assert "val/f1" in metrics

    held_out = np.load(out / "data" / "new_digits.npz")
    predictions = np.genfromtxt(out / "predictions.csv", delimiter=",", names=True)
    assert predictions.dtype.names == ("class", *(f"prob_{k}" for k in range(10)))
    assert len(predictions) == len(held_out["y"]) == 200
    probabilities = np.stack([predictions[f"prob_{k}"] for k in range(10)], axis=1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(predictions["class"], probabilities.argmax(axis=1))
    accuracy = float((predictions["class"].astype(np.int64) == held_out["y"]).mean())
    assert accuracy > MIN_HELD_OUT_ACCURACY, accuracy
    print(f"digits example: val/accuracy {metrics['val/accuracy']:.3f}, held-out {accuracy:.3f}, {elapsed:.1f} s")
