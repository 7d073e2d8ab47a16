"""Process-group life cycle and rank helpers: the only module that reads torchrun's and SLURM's environment.

A plain ``python -m dtrain`` is world size 1 with no process group at all; under torchrun we
initialise one group (NCCL on CUDA, gloo on CPU), put each rank on its own GPU, and tear it down.
A task of a multi-task SLURM step (``srun``, or hydra-submitit-launcher's jobs) without torchrun's
variables is a rank too: its place comes from SLURM's variables (:func:`slurm_env`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dtrain.errors import RankLocalError, UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when world_size == 1 (no process group)
    # Collectives on CPU tensors: the default group under gloo; a gloo group beside NCCL's.
    cpu_group: Any = None
    # Around checkpoints, where rank 0 writes while the others wait: a gloo group with a longer timeout.
    checkpoint_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def env_rank() -> int:
    """This process's global rank from torchrun's environment, else SLURM's (0 outside both).

    Never raises: error reporting asks it which rank speaks; :func:`setup` reports a malformed environment.
    """
    if _torchrun_vars_absent(os.environ):
        with contextlib.suppress(UserError):
            task = _slurm_task(os.environ)
            if task is not None:
                return task[0]
    return _env_int("RANK", 0)


# ---------------------------------------------------------------------------------------------
# SLURM: a task of an srun step is a rank when torchrun's variables are absent

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Derived rendezvous ports lie below Linux's default ephemeral range (32768-60999), so the kernel does not
# hand one out for an outgoing connection; 1500 consecutive job ids x 8 concurrent steps get distinct ports.
_SLURM_PORT_BASE, _SLURM_PORT_JOBS, _SLURM_PORT_STEPS = 20000, 1500, 8


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
        rank, world_size, local_rank = int(procid), int(world), int(environ.get("SLURM_LOCALID") or 0)
    except ValueError:
        raise UserError(
            f"SLURM's SLURM_PROCID={procid!r} / task count {world!r} / SLURM_LOCALID are not integers"
        ) from None
    if world_size <= 1:
        return None
    return rank, world_size, local_rank


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
    rank, world_size, local_rank = task
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    nodelist = next(
        (environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k)), ""
    )
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(nodelist)
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(
        slurm_port(environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", ""))
    )
    return env


def under_slurm() -> bool:
    """True in a task of a multi-task SLURM step that is a rank of its own (no torchrun in between)."""
    return _torchrun_vars_absent(os.environ) and _slurm_task(os.environ) is not None


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07],gpu5`` -> ``node01``."""
    host = next(hostnames(nodelist), None)
    if host is None:
        raise UserError(f"SLURM's node list {nodelist!r} is empty; export MASTER_ADDR=<host of task 0>")
    return host


def hostnames(nodelist: str) -> Iterator[str]:
    """The hosts of a SLURM node list, in order, without asking ``scontrol``.

    The compressed form is a comma-separated list of names, each with any number of bracketed ranges:
    ``node[01-04,07]`` is node01..node04 and node07 (zero padding kept), ``rack[1-2]-n[1-2]`` every
    combination. The whole list is checked first (a malformed one raises :class:`UserError`), then hosts
    are made one at a time: the first host of ``n[1-99999999]`` costs nothing.
    """
    names: list[list[list[tuple[int, int, int]] | str]] = []
    for name in _split_top_level(nodelist.strip(), nodelist):
        parts: list[list[tuple[int, int, int]] | str] = []
        for match in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", name):
            literal, ranges = match.groups()
            if literal:
                parts.append(literal)
            if ranges is not None:
                parts.append(_parse_ranges(ranges, nodelist))
        names.append(parts)
    for parts in names:
        yield from _combine(parts, "")


def _combine(parts: list[list[tuple[int, int, int]] | str], prefix: str) -> Iterator[str]:
    if not parts:
        yield prefix
        return
    first, rest = parts[0], parts[1:]
    if isinstance(first, str):
        yield from _combine(rest, prefix + first)
        return
    for low, high, width in first:
        for number in range(low, high + 1):
            yield from _combine(rest, prefix + str(number).zfill(width))


def _split_top_level(text: str, nodelist: str) -> list[str]:
    """Split at the commas outside brackets, checking that brackets pair up."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise UserError(f"SLURM's node list {nodelist!r} has unbalanced brackets")
    if depth:
        raise UserError(f"SLURM's node list {nodelist!r} has unbalanced brackets")
    names.append(text[start:])
    for name in names:
        if not name.strip() and text:
            raise UserError(f"SLURM's node list {nodelist!r} has an empty host name")
    return [name.strip() for name in names if name.strip()]


def _parse_ranges(ranges: str, nodelist: str) -> list[tuple[int, int, int]]:
    """``01-04,07`` -> [(1, 4, 2), (7, 7, 2)]: (first, last, width), the width of the first number kept."""
    out = []
    for item in ranges.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise UserError(f"SLURM's node list {nodelist!r} has a bad range [{ranges}]")
        out.append((int(low), int(high or low), len(low)))
    return out


def under_torchrun() -> bool:
    """True in a worker that torchrun (the elastic agent) started; a stray WORLD_SIZE does not count."""
    return "TORCHELASTIC_RUN_ID" in os.environ


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


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``auto`` takes this rank's GPU when CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA GPU is available; use trainer.device=cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RankLocalError(f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible; lower --nproc_per_node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device_choice: str, backend_choice: str, timeout_s: float, checkpoint_timeout_s: float) -> DistEnv:
    """Read torchrun's environment (or SLURM's), pick the device, and initialise the process group if world > 1.

    Every collective fails after ``timeout_s`` (``checkpoint_timeout_s`` around checkpoints) instead of
    waiting forever for a rank that died or hangs; with NCCL, asynchronous error handling tears the
    process down on such a failure rather than leaving it stuck in a kernel.
    """
    for name, value in slurm_env().items():  # a SLURM task: torchrun's variables, for env:// below
        os.environ.setdefault(name, value)
    rank = env_rank()
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = pick_device(device_choice, local_rank)
    if world_size == 1:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    backend = backend_choice
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo (or auto) on CPU")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    current_op("process-group initialisation (rendezvous of all ranks)", 0)
    timeout = datetime.timedelta(seconds=timeout_s)
    device_id = device if device.type == "cuda" else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        init_on_fresh_store(backend, rank, world_size, timeout, device_id)
    else:  # outside torchrun, or an agent with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new store per attempt
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    checkpoint_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=checkpoint_timeout_s))
    return DistEnv(rank, world_size, local_rank, device, backend, cpu_group, checkpoint_group)


_STORE_NOTICE = "dtrain/init_store"  # in torchrun's store: "<port> <nonce>" of this attempt's fresh store
_STORE_NONCE = "dtrain/nonce"  # in the fresh store: proves a published address is this attempt's
_PROBE_TIMEOUT = datetime.timedelta(seconds=2)  # per try to connect to a posted address
_fresh_stores: list[Any] = []  # rank 0's store server must live as long as the process group


def init_on_fresh_store(
    backend: str, rank: int, world_size: int, timeout: datetime.timedelta, device_id: torch.device | None
) -> None:
    """``init_process_group`` on a store made for this attempt, not on torchrun's long-lived one.

    Why: torchrun's agent keeps one rendezvous TCPStore for its whole life and, by default, hands it
    to the workers of every attempt (``TORCHELASTIC_USE_AGENT_STORE=True``) with no per-attempt prefix.
    gloo publishes each rank's address under the same keys every time, so after ``--max-restarts``
    restarts a group a new worker can read a *dead* peer's address before the peer republishes it:
    "Gloo connectFullMesh failed ... Connection refused", or a hang in waitUntilConnected. (Setting
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for the agent avoids it; this protects a plain ``torchrun``.)

    How: global rank 0 starts a new TCPStore server on a free port and posts "<port> <nonce>" in the
    agent's store; the others connect only to a server that answers and holds the posted nonce. A notice
    left by an earlier attempt points at a server that died with that attempt's rank 0 (torchrun stops all
    workers before it starts new ones), so it is refused and the reader waits for the new notice.
    MASTER_ADDR is the host of the rendezvous' rank-0 node, where global rank 0 runs.
    """
    host = os.environ["MASTER_ADDR"]
    deadline = time.monotonic() + timeout.total_seconds()
    notice_board = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        _fresh_stores.append(store)
        nonce = uuid.uuid4().hex
        store.set(_STORE_NONCE, nonce)  # before the notice, so that a fresh notice is always valid
        notice_board.set(_STORE_NOTICE, f"{store.port} {nonce}")
    else:
        store = None
        while store is None:
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank {rank}: rank 0 posted no live store within {timeout}")
            port, nonce = notice_board.get(_STORE_NOTICE).decode().split()  # waits for the first notice
            try:  # a dead server refuses a plain connection at once; a TCPStore client would retry and log
                socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT.total_seconds()).close()
            except OSError:
                time.sleep(0.1)  # an earlier attempt's notice: wait for this attempt's rank 0
                continue
            try:  # the port may have been reused since: accept only this attempt's nonce
                candidate = dist.TCPStore(host, int(port), is_master=False, timeout=_PROBE_TIMEOUT)
                if candidate.check([_STORE_NONCE]) and candidate.get(_STORE_NONCE).decode() == nonce:
                    candidate.set_timeout(timeout)
                    store = candidate
                    continue
            except RuntimeError:  # DistNetworkError / DistStoreError: an earlier attempt's server is gone
                pass
            time.sleep(0.1)
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore("default_pg", store),  # the key layout env:// would use
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device_id,
    )


@dataclass
class _Op:
    name: str = "start-up"
    step: int = 0


_CURRENT_OP = _Op()


def current_op(name: str | None = None, step: int | None = None) -> str:
    """Record the collective this rank is about to enter (``name`` at ``step``); return the last one recorded.

    Setting it costs two attribute writes, so the trainer does it before each collective; when one fails
    (a peer died or hangs), the error names what this rank was waiting in.
    """
    if name is not None:
        _CURRENT_OP.name = name
    if step is not None:
        _CURRENT_OP.step = step
    return f"{_CURRENT_OP.name} at step {_CURRENT_OP.step}"


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed: timed out, or lost a peer (gloo and NCCL errors)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text
        for marker in (
            "[gloo",
            "Gloo",
            "gloo/transport",
            "NCCL",
            "Timed out",
            "timed out",
            "Connection closed by peer",
            "Connection reset by peer",
        )
    )


def teardown(env: DistEnv) -> None:
    """Destroy the process group, after collecting garbage.

    A DDP wrapper caught in a reference cycle keeps the group alive past ``destroy_process_group``;
    gloo then tears it down during interpreter shutdown and the process can abort ("terminate called
    without an active exception"). Collecting first frees it while the group is still valid.
    """
    if env.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op on one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Average ``tensors`` over ranks in place with one collective: flatten into a bucket, reduce, copy back.

    One call a step rather than one per tensor: a collective's fixed cost dominates for small tensors.
    """
    if not env.distributed or not tensors:
        return
    bucket = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
    bucket /= env.world_size
    offset = 0
    for t in tensors:
        t.copy_(bucket[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_to_main(value: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None elsewhere), on the checkpoint group."""
    if not env.distributed:
        return [value]
    box: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, box, dst=0, group=env.checkpoint_group)
    return box


def first_error(error: str, env: DistEnv) -> str:
    """The first rank's non-empty ``error`` (prefixed ``rank N:`` unless rank 0's), the same on every rank;
    ``""`` if no rank has one. A collective: lets every rank stop together where one of them cannot go on."""
    errors = [error]
    if env.distributed:
        errors = [""] * env.world_size
        dist.all_gather_object(errors, error, group=env.checkpoint_group)
    for rank, message in enumerate(errors):
        if message:
            return message if rank == 0 else f"rank {rank}: {message}"
    return ""


def broadcast_str(value: str, env: DistEnv) -> str:
    """Rank 0's ``value`` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv, group: Any = None) -> None:
    """Wait for every rank (on ``group``, by default the default group)."""
    if env.distributed:
        dist.barrier(group=group)
