"""End to end through ``python -m dtrain`` on one process: outputs, TensorBoard tags, options."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from tests.conftest import REPO, cli_env, launch
from tests.tb import scalars

SHORT = ("trainer.max_epochs=5", "trainer.log_every=1")


def test_the_default_run_fits_the_surface_and_writes_config_metrics_events_and_model(dtrain_run) -> None:
    """``python -m dtrain`` as a newcomer runs it: the defaults, nothing else (figures aside)."""
    run = dtrain_run()
    files = {p.name for p in run.run_dir.iterdir()}
    assert {"config.yaml", "metrics.json", "model.pt"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files)
    assert not (run.run_dir / ".hydra").exists()  # rank 0 writes config.yaml itself

    metrics = run.metrics
    assert metrics["status"] == "completed"
    assert metrics["world_size"] == 1
    assert metrics["steps"] == 100  # full batch: one step an epoch
    for key in ("train/loss", "val/loss", "lr", "grad_norm/total", "perf/samples_per_sec", "samples_per_sec"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert {f"grad_norm/c{i}" for i in range(5)} <= set(metrics)
    # It converges: the surface's noise is N(0, 0.2^2), so no model gets below an MSE of about 0.04.
    assert metrics["train/loss"] < 0.045 and metrics["val/loss"] < 0.045

    # The resolved config is the one that ran.
    assert "name: poly2d" in (run.run_dir / "config.yaml").read_text()

    # TensorBoard holds what metrics.json says, at the logging steps.
    tags = scalars(run.run_dir)
    expected = {"train/loss", "val/loss", "lr", "grad_norm/total", "perf/samples_per_sec"}
    expected |= {f"grad_norm/c{i}" for i in range(5)}
    assert expected <= set(tags)
    assert [step for step, _ in tags["train/loss"]] == list(range(10, 101, 10))
    for tag in ("train/loss", "val/loss", "grad_norm/total", "grad_norm/c4"):
        assert tags[tag][-1][1] == pytest.approx(metrics[tag], rel=1e-6)
    # The total norm is the norm of the per-parameter norms.
    per_param = [tags[f"grad_norm/c{i}"][-1][1] for i in range(5)]
    assert tags["grad_norm/total"][-1][1] == pytest.approx(math.sqrt(sum(v * v for v in per_param)), rel=1e-5)


def test_loss_decreases_on_every_data_set(dtrain_run) -> None:
    for overrides in (
        ("model=mlp", "data=sine", "optim=adam", "optim.lr=3e-3", "trainer.batch_size=100"),
        ("model=mlp", "data=moons", "optim=adam", "optim.lr=1e-2", "trainer.batch_size=100"),
        ("model=polynomial", "model.degree=5", "data=poly1d", "optim=adam", "optim.lr=3e-2"),
    ):
        run = dtrain_run(*overrides, "trainer.max_epochs=20", "trainer.log_every=1")
        loss = [v for _, v in scalars(run.run_dir)["train/loss"]]
        assert loss[-1] < 0.5 * loss[0], overrides
        if "data=sine" in overrides:
            assert "val/loss_outer" in run.metrics  # extrapolation range reported separately
        if "data=moons" in overrides:
            assert run.metrics["val/accuracy"] > 0.8


def test_gradient_accumulation_matches_one_big_batch(dtrain_run) -> None:
    common = ("model=mlp", "data=sine", "trainer.batch_size=80", "trainer.max_steps=12", "trainer.precision=float64")
    one = dtrain_run(*common).params()
    accumulated = dtrain_run(*common, "trainer.grad_accum_steps=4").params()
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-12, atol=1e-12)


def test_max_steps_and_eval_every(dtrain_run) -> None:
    run = dtrain_run("model=mlp", "data=sine", "trainer.batch_size=64", "trainer.max_steps=7", "trainer.eval_every=3")
    assert run.metrics["steps"] == 7
    val_steps = [step for step, _ in scalars(run.run_dir)["val/loss"]]
    assert val_steps == [3, 6, 7]  # every 3 steps, and the final model


def test_schedules_reach_tensorboard(dtrain_run) -> None:
    run = dtrain_run("schedule=exp_decay", "schedule.decay=0.5", "schedule.min_lr=1e-3", "optim.lr=0.01", *SHORT)
    lrs = [v for _, v in scalars(run.run_dir)["lr"]]
    # The rate each logged step used: epoch t trains at max(min_lr, lr0 * decay^t).
    assert lrs == pytest.approx([max(1e-3, 0.01 * 0.5**t) for t in range(5)], rel=1e-6)


def test_cfg_job_prints_the_resolved_config() -> None:
    out = launch("model=mlp", "optim=adam", "optim.lr=3e-4", "--cfg", "job").stdout
    assert "name: mlp" in out and "lr: 0.0003" in out and "name: adam" in out


def test_console_script_is_installed() -> None:
    out = subprocess.run(
        ["dtrain", "trainer.precision=float64", "--cfg", "job"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "precision: float64" in out


def test_multirun_gives_each_trial_its_own_run_dir_and_survives_a_diverged_trial(tmp_path) -> None:
    sweep = ("-m", "optim.lr=0.01,0.2,-1", "trainer.max_epochs=150", "trainer.progress=off")
    proc = launch(*sweep, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    statuses = [json.loads((tmp_path / str(i) / "metrics.json").read_text())["status"] for i in (0, 1)]
    assert statuses == ["completed", "diverged"]
    # The third trial's bad value is reported in one line and scored as the worst, not fatal to the sweep.
    assert "dtrain: error: optim.lr=-1.0 must be a positive number" in proc.stderr
    assert not (tmp_path / "2" / "metrics.json").exists()


def test_default_evaluation_is_each_epoch_but_no_more_often_than_logging(dtrain_run) -> None:
    run = dtrain_run("trainer.max_epochs=20", "trainer.log_every=5")  # full batch: one step an epoch
    assert [step for step, _ in scalars(run.run_dir)["val/loss"]] == [5, 10, 15, 20]
    run = dtrain_run("model=mlp", "data=sine", "trainer.batch_size=256", "trainer.max_epochs=3", "trainer.log_every=1")
    assert [step for step, _ in scalars(run.run_dir)["val/loss"]] == [4, 8, 12]  # 1280 // 256 = 4 steps an epoch


def test_bf16_mixed_trains_with_float32_weights(dtrain_run) -> None:
    run = dtrain_run(
        "model=mlp",
        "data=sine",
        "trainer.precision=bf16-mixed",
        "trainer.batch_size=200",
        "trainer.max_epochs=8",
        "optim=adam",
        "optim.lr=3e-3",
        "trainer.log_every=1",
    )
    loss = [v for _, v in scalars(run.run_dir)["train/loss"]]
    assert loss[-1] < 0.5 * loss[0]
    assert all(t.dtype == torch.float32 for t in run.params().values())


def test_compiled_model_matches_eager(dtrain_run) -> None:
    common = (
        "model=mlp",
        "model.hidden=[8]",
        "data=sine",
        "trainer.batch_size=200",
        "trainer.max_steps=5",
        "trainer.precision=float64",
    )
    eager = dtrain_run(*common).params()
    compiled = dtrain_run(*common, "trainer.compile=true").params()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-9, atol=1e-9)
