"""Failures under torchrun with 2 gloo ranks: a killed worker, a fault on every attempt, a signal to the
agent, a hanging rank, a NaN on one rank, and two jobs side by side. Each ends in a known state, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import NO_FIGURES, REPO, RESUMABLE_RUN, Run, cli_env, run_dtrain

pytestmark = pytest.mark.multiprocess

# 420 steps, a few seconds: long enough to be interrupted from outside mid-run.
RUN = (
    *RESUMABLE_RUN,
    "trainer.max_epochs=60",
    "trainer.device=cpu",
    "trainer.log_every=10",
    "checkpoint.every_n_steps=20",
)


def torchrun(*args: str, restarts: int = 0, nproc: int = 2) -> list[str]:
    """The command line of a 2-rank standalone torchrun of dtrain."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "dtrain",
        "trainer.progress=lines",
        *NO_FIGURES,
        *args,
    ]


def run_torchrun(*args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    """Run a 2-rank standalone torchrun of dtrain to its end (at most 3 minutes)."""
    return subprocess.run(
        torchrun(*args, restarts=restarts), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180
    )


def start(*args: str, restarts: int = 0, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun(*args, restarts=restarts),
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    """Read the job's stdout until a line starts with ``prefix``."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"the job ended before printing {prefix!r}: {proc.wait()}")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers, for its agent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = run_dtrain(tmp_path_factory.mktemp("whole") / "run", *RUN, "trainer.progress=lines", nproc=2)
    assert run.returncode == 0, run.stderr
    return run


def test_a_worker_killed_from_outside_is_restarted_and_resumes_bitwise(tmp_path: Path, uninterrupted: Run) -> None:
    proc = start(f"hydra.run.dir={tmp_path}", *RUN, restarts=1)
    wait_for_line(proc, "checkpoint:")
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    Run(0, out, err, tmp_path).assert_same_params(uninterrupted)


def test_a_worker_that_dies_after_the_final_checkpoint_does_not_train_again(tmp_path: Path, uninterrupted: Run) -> None:
    fault = ("fault.kind=kill", "fault.rank=0", "fault.step=420")  # after the last step and its checkpoint
    proc = run_torchrun(f"hydra.run.dir={tmp_path}", *RUN, *fault, restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_restart = proc.stdout.split("resumed from")[1]
    assert "at step 420" in after_restart and "\nstep " not in after_restart  # nothing trained again
    Run(0, proc.stdout, proc.stderr, tmp_path).assert_same_params(uninterrupted)


def test_a_fault_on_every_attempt_exhausts_the_restarts_and_names_the_rank(tmp_path: Path) -> None:
    args = (
        f"hydra.run.dir={tmp_path}",
        *RUN,
        "fault.kind=exit",
        "fault.rank=1",
        "fault.step=3",
        "fault.attempts=every",
    )
    proc = run_torchrun(*args, restarts=1)
    assert proc.returncode != 0
    assert proc.stderr.count("fault.kind=exit fires on this rank after step 3") == 2  # both attempts
    assert "rank      : 1 (local_rank: 1)" in proc.stderr and "exitcode  : 1" in proc.stderr


def test_sigterm_to_the_agent_saves_and_resumes_on_fewer_ranks_when_allowed(tmp_path: Path, uninterrupted: Run) -> None:
    proc = start(f"hydra.run.dir={tmp_path}", *RUN)
    wait_for_line(proc, "step ")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - signalled < 30  # inside torchrun's grace before it sends SIGKILL
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step" in err
    stopped_at = json.loads((tmp_path / "checkpoints" / "latest").read_text())["step"]
    assert 10 <= stopped_at < 420
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "preempted"
    # The job comes back on fewer processes: refused unless the world size may change, then resumed; the same
    # global batches in the same order, so equal to the 2-rank run up to float64 rounding.
    refused = run_dtrain(tmp_path, *RUN)
    assert refused.returncode == 2
    assert "world_size was 2, now 1" in refused.stderr and "allow_changes=[world_size]" in refused.stderr
    resumed = run_dtrain(tmp_path, *RUN, "checkpoint.allow_changes=[world_size]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at} (changed: world_size)" in resumed.stdout
    ours, theirs = resumed.params(), uninterrupted.params()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12)


def test_a_hanging_rank_times_out_with_the_rank_and_operation_named(tmp_path: Path) -> None:
    args = (f"hydra.run.dir={tmp_path}", *RUN, "fault.kind=hang", "fault.rank=1", "fault.step=3", "dist.timeout_s=5")
    began = time.monotonic()
    proc = run_torchrun(*args)
    assert proc.returncode != 0
    assert "dtrain: error: rank 0: gradient all-reduce at step 4 failed" in proc.stderr, proc.stderr[-3000:]
    assert "dist.timeout_s=5" in proc.stderr
    assert time.monotonic() - began < 120  # the 5 s timeout, start-up and torchrun's shutdown; not forever


# on_nonfinite=skip needs the ranks to agree before the optimizer step: a NaN on rank 1 alone is skipped by
# both. (on_nonfinite=stop reads the logged loss, reduced across ranks like every metric: test_resume.py and
# test_presets.py stop a run in one process.) Two such jobs at once on one host, each with its own rendezvous
# port and run directory, do not collide.
def test_two_jobs_on_one_host_each_skip_a_nan_on_one_rank(tmp_path: Path) -> None:
    short = (*RUN, "trainer.max_epochs=2", "trainer.on_nonfinite=skip", "fault.kind=nan", "fault.rank=1")
    jobs = [start(*short, "fault.step=5", cwd=tmp_path) for _ in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=180)
        assert job.returncode == 0, err[-3000:]
    metrics = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/*/*/metrics.json")]
    assert len(metrics) == 2  # two run directories
    for values in metrics:
        assert values["train/skipped_steps"] == 1.0 and values["status"] == "completed"
