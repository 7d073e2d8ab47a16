"""Resume through the real command line: exact (bitwise) continuation, resume modes, strict loading,
divergence policies, preemption by signal. One process; the multi-rank cases are in test_elastic.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import NO_FIGURES, REPO, RESUMABLE_RUN, Run, cli_env, run_dtrain
from tests.tb import scalars

# RESUMABLE_RUN plus dropout, so the random generators' state matters too.
MLP = (
    *RESUMABLE_RUN,
    "model.dropout=0.1",
    "trainer.max_epochs=3",
    "trainer.log_every=4",
    "checkpoint.every_n_steps=4",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = run_dtrain(tmp_path_factory.mktemp("whole") / "run", *MLP)
    assert run.returncode == 0, run.stderr
    return run


# 7 steps an epoch, checkpoints every 4: a crash mid-epoch, past a checkpoint. (A crash after the last step:
# test_elastic.py's worker that dies after the final checkpoint.)
def test_a_run_stopped_mid_epoch_resumes_bitwise(tmp_path: Path, uninterrupted: Run) -> None:
    crashed = run_dtrain(tmp_path / "run", *MLP, "fault.kind=exit", "fault.step=13")
    assert crashed.returncode == 1
    resumed = run_dtrain(tmp_path / "run", *MLP)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'}" in resumed.stdout
    resumed.assert_same_result(uninterrupted)
    # TensorBoard drops the crashed attempt's copies of the re-run steps: one value per step, as uninterrupted.
    assert scalars(resumed.run_dir)["train/loss"] == scalars(uninterrupted.run_dir)["train/loss"]


def test_the_graph_model_resumes_bitwise(tmp_path: Path) -> None:
    common = ("model=graph", "model.graph=mlp", "model.hidden=[8]", "data=sine", "data.num_points=200")
    common += ("trainer.batch_size=40", "trainer.max_epochs=3", "trainer.precision=float64", "optim=adam")
    common += ("checkpoint.every_n_steps=3",)
    whole = run_dtrain(tmp_path / "whole", *common)
    assert whole.returncode == 0, whole.stderr
    assert run_dtrain(tmp_path / "run", *common, "fault.kind=exit", "fault.step=7").returncode == 1
    resumed = run_dtrain(tmp_path / "run", *common)
    assert resumed.returncode == 0, resumed.stderr
    resumed.assert_same_result(whole)


def test_a_completed_run_does_not_train_again(tmp_path: Path, uninterrupted: Run) -> None:
    first = run_dtrain(tmp_path / "run", *MLP)
    again = run_dtrain(tmp_path / "run", *MLP)
    assert again.returncode == 0, again.stderr
    assert "at step 21" in again.stdout and "\nstep " not in again.stdout  # no training step logged
    again.assert_same_result(first)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_never_refuses_a_directory_with_checkpoints_unless_told(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_dtrain(run_dir, *MLP, "fault.kind=exit", "fault.step=6").returncode == 1
    before = snapshot(run_dir)
    refused = run_dtrain(run_dir, *MLP, "resume=never")
    assert refused.returncode == 2
    assert "resume=never" in refused.stderr and "checkpoint.overwrite=true" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert snapshot(run_dir) == before  # nothing touched
    fresh = run_dtrain(run_dir, *MLP, "resume=never", "checkpoint.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr
    assert "resumed" not in fresh.stdout


def test_resume_from_a_path_continues_into_a_new_directory(tmp_path: Path, uninterrupted: Run) -> None:
    assert run_dtrain(tmp_path / "old", *MLP, "fault.kind=exit", "fault.step=9").returncode == 1
    resumed = run_dtrain(tmp_path / "new", *MLP, f"resume={tmp_path / 'old'}")
    assert resumed.returncode == 0, resumed.stderr
    resumed.assert_same_result(uninterrupted)


@pytest.fixture
def crashed_run(tmp_path: Path) -> Path:
    """A run directory whose run stopped after step 9 (latest checkpoint: step 8)."""
    run_dir = tmp_path / "run"
    assert run_dtrain(run_dir, *MLP, "fault.kind=exit", "fault.step=9").returncode == 1
    return run_dir


def test_a_changed_learning_rate_needs_permission(crashed_run: Path) -> None:
    refused = run_dtrain(crashed_run, *MLP, "optim.lr=5e-3")
    assert refused.returncode == 2
    assert "optim.lr was 0.01, now 0.005" in refused.stderr and "allow_changes=[optim.lr]" in refused.stderr
    allowed = run_dtrain(crashed_run, *MLP, "optim.lr=5e-3", "checkpoint.allow_changes=[optim.lr]")
    assert allowed.returncode == 0, allowed.stderr
    # The cosine schedule continues from its position, on the new base rate.
    lrs = dict(scalars(crashed_run)["lr"])
    total = 21
    for step in (12, 20):
        expected = 5e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step - 1) / total)).item())
        assert lrs[step] == pytest.approx(expected, rel=1e-6)


def test_a_checkpoint_of_another_model_is_refused(crashed_run: Path, tmp_path: Path) -> None:
    other = run_dtrain(tmp_path / "other", *MLP, "model.hidden=[32,32]", f"resume={crashed_run}")
    assert other.returncode == 2
    assert "model.hidden was [16, 16], now [32, 32]" in other.stderr and "cannot change on resume" in other.stderr
    assert not (tmp_path / "other").exists()  # refused before the run directory was made


def test_a_truncated_checkpoint_is_refused_by_name(crashed_run: Path) -> None:
    latest = crashed_run / "checkpoints" / "step-00000008.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    run = run_dtrain(crashed_run, *MLP)
    assert run.returncode == 2
    assert f"checkpoint {latest} is truncated" in run.stderr and "Traceback" not in run.stderr


def test_skip_policy_skips_a_nan_step_and_finishes(tmp_path: Path) -> None:
    run = run_dtrain(tmp_path / "run", *MLP, "trainer.on_nonfinite=skip", "fault.kind=nan", "fault.step=5")
    assert run.returncode == 0, run.stderr
    assert "step 5: non-finite loss or gradient on some rank: step skipped" in run.stdout
    assert run.metrics["train/skipped_steps"] == 1.0 and run.metrics["status"] == "completed"
    assert all(torch.isfinite(p).all() for p in run.params().values())


def test_stop_policy_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = run_dtrain(tmp_path / "run", *MLP, "fault.kind=nan", "fault.step=6")
    assert run.returncode == 3
    assert "training diverged: non-finite loss or gradient between steps 5 and 8" in run.stderr
    assert "lower the learning rate" in run.stderr
    assert run.metrics["status"] == "diverged"
    latest = json.loads((run.run_dir / "checkpoints" / "latest").read_text())
    assert latest["step"] == 4  # the step-8 checkpoint would hold the NaN: it was never written
    assert not (run.run_dir / "model.pt").exists()


# 700 steps (a few seconds): a signal sent at the first logging step arrives long before the end.
LONG = (*MLP, "trainer.max_epochs=100", "checkpoint.every_n_steps=250")


@pytest.fixture(scope="module")
def long_uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = run_dtrain(tmp_path_factory.mktemp("long") / "run", *LONG)
    assert run.returncode == 0, run.stderr
    return run


# SIGTERM here; SIGUSR1 (what SLURM sends before a time limit) takes the same handler: test_train_parts.py
# raises it in process, test_deploy.py sends it to the SLURM batch script.
def test_a_stop_signal_saves_a_checkpoint_and_exits_75_then_resumes_exactly(
    tmp_path: Path, long_uninterrupted: Run
) -> None:
    signum = signal.SIGTERM
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtrain", f"hydra.run.dir={run_dir}", "trainer.progress=lines", *NO_FIGURES, *LONG],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step "):
            proc.send_signal(signum)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert f"stopped by {signal.Signals(signum).name} after step" in err and "launch the same command" in err
    assert not (run_dir / "model.pt").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "preempted"
    stopped_at = json.loads((run_dir / "checkpoints" / "latest").read_text())["step"]
    assert 4 <= stopped_at < 700
    resumed = run_dtrain(run_dir, *LONG)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}" in resumed.stdout
    resumed.assert_same_result(long_uninterrupted)
