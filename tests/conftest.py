"""Shared helpers: run dtrain through its real command line, on one process or under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A small MLP on shuffled mini-batches (7 steps an epoch) with Adam and a cosine schedule, in float64: every
# piece of state a resume must restore (data order, optimizer moments, schedule position) is exercised.
RESUMABLE_RUN = (
    "model=mlp",
    "model.hidden=[16,16]",
    "data=sine",
    "data.num_points=400",
    "optim=adam",
    "optim.lr=1e-2",
    "schedule=cosine",
    "trainer.batch_size=32",
    "trainer.precision=float64",
)
# Drawing the model's figure costs a second or more a run (matplotlib's import, then 0.1-0.5 s a figure):
# tests that do not look at it turn it off (launch() adds this unless a test sets trainer.figures itself).
NO_FIGURES = ("trainer.figures=false",)
# What a run measures about the machine rather than the training: left out of bitwise comparisons.
TIMING_METRICS = ("perf/samples_per_sec", "perf/step_time_ms", "samples_per_sec", "wall_time_s")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def metrics(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())

    def params(self) -> dict[str, torch.Tensor]:
        return torch.load(self.run_dir / "model.pt")

    def assert_same_params(self, other: Run) -> None:
        """Bitwise-equal final parameters."""
        mine, theirs = self.params(), other.params()
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name

    def assert_same_result(self, other: Run) -> None:
        """Bitwise-equal final parameters and metrics (timings aside)."""
        self.assert_same_params(other)
        a = {k: v for k, v in self.metrics.items() if k not in TIMING_METRICS}
        b = {k: v for k, v in other.metrics.items() if k not in TIMING_METRICS}
        assert a == b


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def launch(*args: str, nproc: int = 0, cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m dtrain ARGS`` (nproc=0) or ``torchrun --standalone --nproc_per_node=nproc -m dtrain ARGS``."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    training = not (args and args[0] in ("gradcheck", "report", "lr-find"))
    if training and not any(a.startswith("trainer.figures=") for a in args):
        # Next to the other overrides: Hydra's parser takes them as one run of positional arguments.
        args = (*args, *NO_FIGURES) if args and args[0].startswith("-") else (*NO_FIGURES, *args)
    return subprocess.run(
        [*launcher, "-m", "dtrain", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_dtrain(run_dir: Path, *overrides: str, nproc: int = 0) -> Run:
    """Train into ``run_dir`` through the CLI and collect what happened."""
    proc = launch(f"hydra.run.dir={run_dir}", "trainer.progress=lines", *overrides, nproc=nproc)
    return Run(proc.returncode, proc.stdout, proc.stderr, run_dir)


def assert_ok(run: Run) -> Run:
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    return run


@pytest.fixture
def dtrain_run(tmp_path: Path):
    """Call as ``dtrain_run("model=mlp", ...)``; each call gets a fresh run directory."""
    counter = iter(range(1000))

    def _run(*overrides: str, nproc: int = 0, check: bool = True) -> Run:
        run = run_dtrain(tmp_path / f"run{next(counter)}", *overrides, nproc=nproc)
        return assert_ok(run) if check else run

    return _run
