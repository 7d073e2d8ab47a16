"""Shared helpers: run dtrain through its real command line, on one process or under torchrun.

A one-process run goes through the real entry point (``dtrain.__main__.main``: Hydra, the config checks,
the exit status, what it prints) inside the test process, which saves the 3-4 s a fresh interpreter
spends importing torch and Hydra. A run that must have a process of its own gets one: under torchrun,
where a fault ends the process (``fault.kind=exit|kill|hang``), and where a test asks (``own_process``),
e.g. to compare separate processes or to run several at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import traceback
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
        return torch.load(self.run_dir / "model.pt")["state_dict"]

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


def figures_off(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` of a training run with ``trainer.figures=false`` added, unless the test sets it itself."""
    from dtrain.commands import SUBCOMMANDS

    if (args and args[0] in SUBCOMMANDS) or any(a.startswith("trainer.figures=") for a in args):
        return args
    # Next to the other overrides: Hydra's parser takes them as one run of positional arguments.
    return (*args, *NO_FIGURES) if args and args[0].startswith("-") else (*NO_FIGURES, *args)


def launch(*args: str, nproc: int = 0, cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m dtrain ARGS`` (nproc=0) or ``torchrun --standalone --nproc_per_node=nproc -m dtrain ARGS``."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, "-m", "dtrain", *figures_off(args)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Faults that end the process they fire in: such a run needs a process of its own.
PROCESS_ENDING_FAULTS = ("fault.kind=exit", "fault.kind=kill", "fault.kind=hang")


def run_dtrain(run_dir: Path, *overrides: str, nproc: int = 0, own_process: bool = False) -> Run:
    """Train into ``run_dir`` through the CLI and collect what happened."""
    args = (f"hydra.run.dir={run_dir}", "trainer.progress=lines", *overrides)
    if nproc or own_process or any(o in PROCESS_ENDING_FAULTS for o in overrides):
        proc = launch(*args, nproc=nproc)
        return Run(proc.returncode, proc.stdout, proc.stderr, run_dir)
    returncode, stdout, stderr = main_in_process(*args)
    return Run(returncode, stdout, stderr, run_dir)


def main_in_process(*args: str) -> tuple[int, str, str]:
    """``python -m dtrain ARGS`` in this process: (exit status, stdout, stderr), as a fresh process would give.

    As :func:`launch`: one thread (OMP_NUM_THREADS=1), no model figures unless asked for, no
    HYDRA_FULL_ERROR. The caller's random generators, threads and argv are put back afterwards.
    """
    import dtrain.__main__ as entry

    args = figures_off(args)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    saved_random, saved_full_error = random.getstate(), os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = ["dtrain", *args]
    torch.set_num_threads(1)
    returncode = 0
    try:
        with torch.random.fork_rng(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.main()
            except SystemExit as exc:
                returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # a bug: a fresh process would print the traceback and exit 1
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        random.setstate(saved_random)
        if saved_full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
    return returncode, out.getvalue(), err.getvalue()


def assert_ok(run: Run) -> Run:
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    return run


@pytest.fixture
def dtrain_run(tmp_path: Path):
    """Call as ``dtrain_run("model=mlp", ...)``; each call gets a fresh run directory."""
    counter = iter(range(1000))

    def _run(*overrides: str, nproc: int = 0, check: bool = True, own_process: bool = False) -> Run:
        run = run_dtrain(tmp_path / f"run{next(counter)}", *overrides, nproc=nproc, own_process=own_process)
        return assert_ok(run) if check else run

    return _run
