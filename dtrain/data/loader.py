"""Batches of a split, sharded across ranks: the plan of rows, and the in-memory loader that indexes tensors.

The in-memory loader needs no DataLoader and no workers; :mod:`dtrain.data.dataloader` follows the same plan
through a DataLoader for data sets read from disk.

Every rank computes the same permutation from (seed, epoch) (with a full batch, the identity).
Optimizer step ``k`` consumes the global batch ``perm[k*B:(k+1)*B]``, and rank ``r`` takes its
contiguous ``B/world`` slice of it. So

* shards are disjoint within an epoch and together cover the first ``steps * B`` samples;
* each rank runs exactly ``N // B`` steps an epoch, so no collective ever waits on a rank that ran
  out of data (the last partial batch is dropped);
* the global batch at step ``k`` does not depend on the world size, which is what makes an
  N-rank run equal a 1-rank run with the same global batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from dtrain.data.dataset import Split
from dtrain.errors import ConfigError

EMPTY_TRAINING_SPLIT = "the training split is empty; lower data.val_fraction or provide more data"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s randomness (its sample order; a DataLoader's workers): a pure function of the run's
    seed and the epoch."""
    return (seed * 1_000_003 + epoch) % (2**63)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a pure function of (seed, epoch), identical on every rank."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``rank``'s share of ``num_samples`` (sizes differ by at most one)."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class BatchPlan:
    """Which rows each rank takes at each optimizer step: the checks and the arithmetic both loaders share.

    Step ``k`` of an epoch is the global batch ``perm[k*B:(k+1)*B]``; this rank's rows are its contiguous
    ``B/world`` slice of it, cut into ``grad_accum_steps`` micro-batches.
    """

    def __init__(
        self,
        num: int,
        global_batch: int | None,
        rank: int,
        world_size: int,
        seed: int,
        grad_accum_steps: int = 1,
    ) -> None:
        if num == 0:
            raise ConfigError(EMPTY_TRAINING_SPLIT)
        batch = num if global_batch is None else global_batch
        per_step = world_size * grad_accum_steps
        if batch > num:
            raise ConfigError(
                f"trainer.batch_size={batch} is larger than the training set ({num} samples); "
                f"use at most {num}, or null for the full batch"
            )
        if batch % per_step:
            what = "trainer.batch_size" if global_batch is not None else "the full batch (trainer.batch_size=null)"
            raise ConfigError(
                f"{what}={batch} is not divisible by world_size x grad_accum_steps = "
                f"{world_size} x {grad_accum_steps}; pick a multiple of {per_step}"
            )
        self.num_samples = num
        self.global_batch = batch
        self.micro_batch = batch // per_step
        self.rank_batch = self.micro_batch * grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.grad_accum_steps = grad_accum_steps
        self.steps_per_epoch = num // batch
        self.full_batch = batch == num

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's sample order; None for the full batch, whose order cannot matter to the mean."""
        return None if self.full_batch else epoch_permutation(self.num_samples, self.seed, epoch)

    def close(self) -> None:
        """Release what reading batches holds (a DataLoader's workers); the in-memory loader holds nothing."""

    def rank_rows(self, step: int) -> tuple[int, int]:
        """[lo, hi) of the epoch's order that this rank takes at ``step``."""
        lo = step * self.global_batch + self.rank * self.rank_batch
        return lo, lo + self.rank_batch


class ShardedBatches(BatchPlan):
    """Per-step micro-batches of this rank's shard of a split that lives on the training device."""

    def __init__(
        self,
        split: Split,
        global_batch: int | None,
        rank: int,
        world_size: int,
        seed: int,
        grad_accum_steps: int = 1,
    ) -> None:
        super().__init__(len(split), global_batch, rank, world_size, seed, grad_accum_steps)
        self.split = split
        # Full batch: the same contiguous views serve every step, rather than a shuffled copy of the whole set.
        self._full_batch = next(self._batches(0, None)) if self.full_batch else None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """For each optimizer step of ``epoch`` from ``start_step`` on (a resumed run starts mid-epoch), this
        rank's ``grad_accum_steps`` micro-batches."""
        if self._full_batch is not None:
            return itertools.repeat(self._full_batch, self.steps_per_epoch - start_step)
        perm = self.order(epoch).to(self.split.x.device, non_blocking=True)
        return self._batches(start_step, perm)

    def _batches(self, start_step: int, perm: torch.Tensor | None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The micro-batches of each step from ``start_step`` on: contiguous slices, or the rows ``perm`` picks."""
        for step in range(start_step, self.steps_per_epoch):
            start, _ = self.rank_rows(step)
            micro = []
            for m in range(self.grad_accum_steps):
                lo, hi = start + m * self.micro_batch, start + (m + 1) * self.micro_batch
                if perm is None:
                    micro.append((self.split.x[lo:hi], self.split.y[lo:hi]))
                else:
                    idx = perm[lo:hi]
                    micro.append((self.split.x[idx], self.split.y[idx]))
            yield micro
