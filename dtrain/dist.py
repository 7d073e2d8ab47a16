"""Process-group life cycle and rank helpers: the only module that reads torchrun's environment.

A plain ``python -m dtrain`` is world size 1 with no process group at all; under torchrun we
initialise one group (NCCL on CUDA, gloo on CPU), put each rank on its own GPU, and tear it down.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import time
import uuid
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
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    return _env_int("RANK", 0)


def under_torchrun() -> bool:
    """True in a worker that torchrun (the elastic agent) started; a stray WORLD_SIZE does not count."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch_id() -> str:
    """A name for this launch, the same on every local rank and across torchrun's restarts.

    Under torchrun it comes from the agent (the workers' parent): its start time and the
    rendezvous id, which torchrun keeps across elastic restarts, so a restarted worker finds
    the run directory of its first attempt. Outside torchrun it is this process's start time.
    ``DTRAIN_RUN_ID`` overrides both (for multi-node jobs: every node must agree).
    """
    explicit = os.environ.get("DTRAIN_RUN_ID")
    if explicit:
        return explicit
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
    """Read torchrun's environment, pick the device, and initialise the process group if world > 1.

    Every collective fails after ``timeout_s`` (``checkpoint_timeout_s`` around checkpoints) instead of
    waiting forever for a rank that died or hangs; with NCCL, asynchronous error handling tears the
    process down on such a failure rather than leaving it stuck in a kernel.
    """
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
        marker in text for marker in ("[gloo", "Gloo", "NCCL", "Timed out", "Connection closed by peer", "timed out")
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
