"""Batches of a data set read from disk (a user's ``Dataset``, memory-mapped ``.npy``), through a DataLoader.

The rows of each step come from the same :class:`~dtrain.data.loader.BatchPlan` as the in-memory loader's:
the order is a pure function of (seed, epoch), each rank reads only its own slice of each global batch, and
every rank runs the same number of steps. So a run gives the same batches at any world size, and resuming
mid-epoch needs nothing but the step the checkpoint already records: the sampler starts there.

That is why the position is the sampler's own and not a ``StatefulDataLoader``'s: the state is three integers
(seed, epoch, step) that are the same on every rank, so a checkpoint resumes at another world size too, and
no per-rank loader state (whose worker snapshots depend on the worker count) has to be kept under rank keys.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from dtrain.data.dataset import DatasetSplit
from dtrain.data.loader import BatchPlan, ShardedBatches, epoch_seed
from dtrain.launch_env import STOP_SIGNALS


class StepSampler(Sampler[torch.Tensor]):
    """This rank's positions in the split for each step of an epoch, from the step it resumes at: a tensor, not a
    list of Python ints, so a batch of many rows costs no Python objects per row."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.perm: torch.Tensor | None = None
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int) -> None:
        self.perm, self.start_step = self.plan.order(epoch), start_step

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(self.start_step, self.plan.steps_per_epoch):
            lo, hi = self.plan.rank_rows(step)
            yield torch.arange(lo, hi) if self.perm is None else self.perm[lo:hi]

    def __len__(self) -> int:
        return self.plan.steps_per_epoch - self.start_step


class _SplitRows:
    """The split as the DataLoader's dataset: a whole batch of positions read in one call (``__getitems__``)."""

    def __init__(self, split: DatasetSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> Any:
        return self.split.fetch([position])

    def __getitems__(self, positions: torch.Tensor) -> Any:
        return self.split.fetch(positions)


def _quiet_worker(worker_id: int) -> None:
    """A worker leaves stop signals to the training process: torchrun and SLURM signal every process of the job,
    and a worker that died of SIGTERM would end training before the agreed checkpoint (docs/reliability.md). It
    ends when the training process ends its epoch or training (:meth:`LoaderBatches.close`, which kills one that
    does not). A handler that does nothing, not SIG_IGN: programs a Dataset starts keep their default
    handling."""
    for signum in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(signum, _ignore)


def _ignore(signum: int, frame: Any) -> None:
    """The stop signal is the training process's to act on (:func:`_quiet_worker`)."""


def _collated(batch: Any) -> Any:
    """The batch is collated where it is read (:meth:`DatasetSplit.fetch`); a module-level function, so that worker
    processes can unpickle it."""
    return batch


class LoaderBatches(BatchPlan):
    """Per-step micro-batches of this rank's rows of a :class:`DatasetSplit`, read by ``num_workers`` processes.

    Workers live for one epoch (or the part of it a resumed run has left), and :meth:`close` ends them where
    training stops mid-epoch: none outlives the run. Pinned memory where the device is a GPU. Each epoch's worker
    seeds come from (seed, epoch, rank), not from the training process's random state, which they would
    otherwise consume.
    """

    def __init__(
        self,
        split: DatasetSplit,
        global_batch: int | None,
        rank: int,
        world_size: int,
        seed: int,
        grad_accum_steps: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(len(split), global_batch, rank, world_size, seed, grad_accum_steps)
        self.split = split
        self.sampler = StepSampler(self)
        self.generator = torch.Generator()
        self.pinned = split.device.type == "cuda"
        self.loader = DataLoader(
            _SplitRows(split),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collated,
            pin_memory=self.pinned,
            generator=self.generator,
            worker_init_fn=_quiet_worker if num_workers > 0 else None,
        )
        self._current: Iterator[Any] | None = None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """For each optimizer step of ``epoch`` from ``start_step`` on, this rank's ``grad_accum_steps``
        micro-batches, on the training device."""
        self.close()
        self.sampler.set_epoch(epoch, start_step)
        # Each rank's workers their own streams (a random augmentation must not repeat across ranks).
        self.generator.manual_seed((epoch_seed(self.seed, epoch) * 1_009 + self.rank) % (2**63))
        self._current = self._read(iter(self.loader))
        return self._current

    def _read(self, batches: Iterator[Any]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        workers = list(getattr(batches, "_workers", []))  # the iterator's worker processes (none without workers)
        try:
            for batch in batches:
                x, y = self.split.convert(batch, non_blocking=self.pinned)
                yield list(zip(x.split(self.micro_batch), y.split(self.micro_batch), strict=True))
        finally:
            del batches  # the last reference to the DataLoader's iterator: its workers are shut down now
            for worker in workers:  # one stuck in a read ignores the shutdown's SIGTERM (_quiet_worker)
                if worker.is_alive():
                    worker.kill()

    def close(self) -> None:
        """End the current epoch's workers (training stopped mid-epoch, or a new epoch begins)."""
        if self._current is not None:
            self._current.close()  # type: ignore[attr-defined]
            self._current = None


def build_batches(
    split: Any,
    global_batch: int | None,
    rank: int,
    world_size: int,
    seed: int,
    grad_accum_steps: int = 1,
    num_workers: int = 0,
) -> BatchPlan:
    """The loader for ``split``: indexing tensors in memory, or a DataLoader over a :class:`DatasetSplit`."""
    if isinstance(split, DatasetSplit):
        return LoaderBatches(split, global_batch, rank, world_size, seed, grad_accum_steps, num_workers)
    return ShardedBatches(split, global_batch, rank, world_size, seed, grad_accum_steps)
