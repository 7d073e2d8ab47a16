"""How many members to fuse into one forward and backward: measured, once, at start-up.

Fusing M members turns M small kernels into one large one. While each member's work is small that
is a large gain (kernel launches and Python overhead are paid once); once a member's work fills the
caches by itself, a fused step streams M times the activations through memory and can lose to
running the members one after another (docs/benchmarks.md has the figures). Which side of that line
a model falls on depends on the machine, so on a CPU we time a few chunk sizes on the first batch
and keep the fastest. Chunk 1 runs a member with plain autograd, as a single run would, so the
choice is never slower than training the members in sequence. On a GPU fusing all members wins
for the model sizes dtrain trains, and timing would need device syncs: all members are fused.
"""

from __future__ import annotations

import time

import torch

from dtrain.population.stacked import StackedModel


def chunk_candidates(size: int) -> list[int]:
    """``size``, then halvings down to 1: ``[32, 16, 8, 4, 2, 1]``."""
    sizes = [size]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // 2))
    return sizes


def _seconds_per_member(model: StackedModel, chunk: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    model.chunk = chunk
    model.losses_and_grads(x, y)  # warm-up: first calls allocate and trace
    started = time.perf_counter()
    for _ in range(repeats):
        model.losses_and_grads(x, y)
    return (time.perf_counter() - started) / (repeats * model.size)


def pick_chunk(model: StackedModel, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> tuple[int, dict[int, float]]:
    """The fastest chunk size for ``model`` on the batch (x, y), and the seconds per member of those timed.

    Gradients are computed and thrown away: parameters and optimizer state are untouched. Timing stops
    once two smaller chunks in a row were slower than the best so far.
    """
    if x.device.type == "cuda" or model.size == 1:
        return model.size, {}
    timings: dict[int, float] = {}
    worse_in_a_row = 0
    for chunk in chunk_candidates(model.size):
        timings[chunk] = _seconds_per_member(model, chunk, x, y, repeats)
        if timings[chunk] > min(timings.values()):
            worse_in_a_row += 1
            if worse_in_a_row == 2:
                break
        else:
            worse_in_a_row = 0
    best = min(timings, key=timings.__getitem__)
    model.chunk = best
    return best, timings
