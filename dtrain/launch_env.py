"""Where this process sits in the launch, read from torchrun's and SLURM's environment; no torch.

The only module that reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``TORCHELASTIC_RUN_ID``) and SLURM's. A plain ``python -m dtrain`` is rank 0 of a world of 1. A task
of a multi-task SLURM step (``srun``, or hydra-submitit-launcher's jobs) without torchrun's variables
is a rank too: its place comes from SLURM's variables (:func:`slurm_env`).

Kept free of torch so that the entry point and the sweep launcher can ask these questions cheaply;
the process group itself is :mod:`dtrain.dist`'s.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from dtrain.errors import UserError
from dtrain.slurm_hostlist import first_host

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Derived rendezvous ports lie below Linux's default ephemeral range (32768-60999), so the kernel does not
# hand one out for an outgoing connection; 1500 consecutive job ids x 8 concurrent steps get distinct ports.
_SLURM_PORT_BASE, _SLURM_PORT_JOBS, _SLURM_PORT_STEPS = 20000, 1500, 8


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


# ---------------------------------------------------------------------------------------------
# This process's place: torchrun's variables, else a SLURM task's


def rank() -> int:
    """This process's global rank from torchrun's environment, else SLURM's (0 outside both).

    Never raises on a malformed SLURM environment: error reporting asks it which rank speaks;
    :func:`place` (and so ``dist.setup``) reports it.
    """
    if _torchrun_vars_absent(os.environ):
        with contextlib.suppress(UserError):
            task = _slurm_task(os.environ)
            if task is not None:
                return task[0]
    return _env_int("RANK", 0)


def place() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, else SLURM's; (0, 1, 0) outside both.

    Raises :class:`UserError` when SLURM's task variables are not integers.
    """
    if _torchrun_vars_absent(os.environ):
        task = _slurm_task(os.environ)
        if task is not None:
            return task
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)


def under_torchrun() -> bool:
    """True in a worker that torchrun (the elastic agent) started; a stray WORLD_SIZE does not count."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def under_slurm() -> bool:
    """True in a task of a multi-task SLURM step that is a rank of its own (no torchrun in between)."""
    return _torchrun_vars_absent(os.environ) and _slurm_task(os.environ) is not None


# ---------------------------------------------------------------------------------------------
# SLURM: a task of an srun step is a rank when torchrun's variables are absent


def _torchrun_vars_absent(environ: Mapping[str, str]) -> bool:
    return not any(environ.get(name) for name in _TORCHRUN_VARS)


def _slurm_task(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of a task of a multi-task SLURM step; None for anything else.

    The step's own task count (``SLURM_STEP_NUM_TASKS``, set by srun) comes before the job's
    (``SLURM_NTASKS``): a step may use part of the job's allocation.
    """
    procid = environ.get("SLURM_PROCID")
    world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if not procid or not world:
        return None
    try:
        task_rank, world_size, local_rank = int(procid), int(world), int(environ.get("SLURM_LOCALID") or 0)
    except ValueError:
        raise UserError(
            f"SLURM's SLURM_PROCID={procid!r} / task count {world!r} / SLURM_LOCALID are not integers"
        ) from None
    if world_size <= 1:
        return None
    return task_rank, world_size, local_rank


def slurm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) derived from SLURM's.

    Empty unless this is a task of a SLURM step of two or more tasks and torchrun's variables are absent
    (torchrun started inside a SLURM job keeps its own). The rendezvous host is the first node of the
    step (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``), where SLURM puts task 0; the port comes
    from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``, so every task of the step derives the same one without
    talking. A MASTER_ADDR or MASTER_PORT the user exported wins.
    """
    environ = os.environ if environ is None else environ
    task = _slurm_task(environ) if _torchrun_vars_absent(environ) else None
    if task is None:
        return {}
    task_rank, world_size, local_rank = task
    env = {"RANK": str(task_rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    nodelist = next(
        (environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k)), ""
    )
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(nodelist)
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(
        slurm_port(environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", ""))
    )
    return env


def slurm_port(job_id: str, step_id: str = "") -> int:
    """The rendezvous port of a SLURM job step: the same in all its tasks, different for neighbouring jobs."""
    try:
        job = int(job_id)
    except ValueError:
        raise UserError(
            f"SLURM_JOB_ID={job_id!r} is not a job number, so the ranks cannot agree on a port; export MASTER_PORT"
        ) from None
    step = int(step_id) if step_id.isdigit() else 0  # the batch step has none, or a name
    return _SLURM_PORT_BASE + (job % _SLURM_PORT_JOBS) * _SLURM_PORT_STEPS + step % _SLURM_PORT_STEPS


# ---------------------------------------------------------------------------------------------
# The launch's name: the run directory's, the same on every rank of the launch


def launch_id() -> str:
    """A name for this launch, the same on every local rank and across torchrun's restarts.

    Under torchrun it comes from the agent (the workers' parent): its start time and the
    rendezvous id, which torchrun keeps across elastic restarts, so a restarted worker finds
    the run directory of its first attempt. In a multi-task SLURM step (no torchrun) it is
    ``slurm-<job id>.<step id>``. Otherwise it is this process's start time.
    ``DTRAIN_RUN_ID`` overrides both (for multi-node jobs: every node must agree).
    """
    explicit = os.environ.get("DTRAIN_RUN_ID")
    if explicit:
        return explicit
    if not under_torchrun() and under_slurm():
        # Every task of the step, on every node, and the same step after SLURM requeues the job (which
        # keeps its id), so a requeued job resumes from its checkpoints. No clock: tasks start apart.
        step = os.environ.get("SLURM_STEP_ID", "")
        return f"slurm-{os.environ.get('SLURM_JOB_ID', 'job')}" + (f".{step}" if step else "")
    if under_torchrun():
        agent = os.getppid()
        started = _process_start_time(agent) or time.time()
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        # Without an --rdzv-id torchrun's id is "none": the agent's pid then keeps two jobs apart.
        if run_id == "none":
            token = f"p{agent}"
        elif _UUID.fullmatch(run_id):
            token = run_id[:8]  # torchrun's own random id: 8 hex digits are plenty
        else:
            token = run_id  # a user's --rdzv-id, kept whole so job_01 and job_02 stay apart
    else:
        started = _START_TIME
        token = f"{os.getpid():x}"
    stamp = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d/%H-%M-%S")
    return f"{stamp}-{token}"


_START_TIME = time.time()
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of ``pid`` from /proc (Linux); None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks since boot
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# What schedulers send before they stop a job: torchrun's agent and Kubernetes SIGTERM, SLURM SIGUSR1 (--signal)
# or submitit SIGUSR2. dtrain.preemption acts on them; DataLoader workers leave them to the training process.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def tell_torchrun(message: str) -> None:
    """Leave ``message`` where torchrun looks for a failed worker's story: the error file it names in
    ``TORCHELASTIC_ERROR_FILE`` (``torch.distributed.elastic.multiprocessing.errors``). torchrun ends its
    failure summary with the first failed worker's message (``traceback : ...``), so a user error is the last
    line a user reads rather than a line lost above torchrun's own traceback. No-op outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": message, "timestamp": int(time.time())}
    # A torchrun that cannot read it falls back to its own summary.
    with contextlib.suppress(OSError), open(path, "w") as handle:
        json.dump(record, handle)
