"""Process-group life cycle and the collectives the trainer uses.

A plain ``python -m dtrain`` is world size 1 with no process group at all; under torchrun (or as a task
of a multi-task SLURM step) we initialise one group (NCCL on CUDA, gloo on CPU), put each rank on its own
GPU, and tear it down. Where this process sits comes from :mod:`dtrain.launch_env`.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dtrain import launch_env
from dtrain.errors import RankLocalError, UserError
from dtrain.fresh_store import init_on_fresh_store


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
    """Take this process's place from torchrun's (or SLURM's) environment, pick the device, and initialise
    the process group if world > 1.

    Every collective fails after ``timeout_s`` (``checkpoint_timeout_s`` around checkpoints) instead of
    waiting forever for a rank that died or hangs; with NCCL, asynchronous error handling tears the
    process down on such a failure rather than leaving it stuck in a kernel.
    """
    for name, value in launch_env.slurm_env().items():  # a SLURM task: torchrun's variables, for env:// below
        os.environ.setdefault(name, value)
    rank, world_size, local_rank = launch_env.place()
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
