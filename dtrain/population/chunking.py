"""How many members to fuse into one forward and backward: measured, once, at start-up.

Fusing M members turns M small kernels into one large one. While each member's work is small that
is a large gain (kernel launches and Python overhead are paid once); once a member's work fills the
caches by itself, a fused step streams M times the activations through memory and can lose to
running the members one after another (docs/benchmarks.md has the figures). Which side of that line
a model falls on depends on the machine, so on a CPU we time chunk sizes (1, 2, 4, ...) on the
first batch and keep the fastest. Chunk 1 runs a member with plain autograd, as a single run would, so the
choice is never slower than training the members in sequence. On a GPU fusing all members wins
for the model sizes dtrain trains, and timing would need device syncs: all members are fused.
"""

from __future__ import annotations

import time

import torch

from dtrain.population.stacked import StackedModel

FUSING_MARGIN = 0.1
TIMED_MEMBERS = 16


def chunk_candidates(size: int) -> list[int]:
    """1, then doublings, then ``size``: ``[1, 2, 4, 8, 16, 32]`` for 32, ``[1, 2, 4, 5]`` for 5."""
    sizes = [1]
    while sizes[-1] * 2 < size:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == size else [*sizes, size]


def _seconds_per_member(model: StackedModel, chunk: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Seconds per member of fused forwards and backwards in chunks of ``chunk`` (the best of ``repeats``).

    Every size is timed over the same span of members (TIMED_MEMBERS, or one chunk where that is larger), in
    consecutive chunks as training runs them: a single chunk timed over and over keeps its memory in cache
    and looks faster than it is.
    """
    span = max(chunk, min(model.size, TIMED_MEMBERS) // chunk * chunk)

    def one_pass() -> None:
        for lo in range(0, span, chunk):
            model.chunk_losses_and_grads(lo, lo + chunk, x, y)

    one_pass()  # warm-up: first calls allocate
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - started)
    return best / span


def pick_chunk(model: StackedModel, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> tuple[int, dict[int, float]]:
    """The fastest chunk size for ``model`` on the batch (x, y), and the seconds per member of each size timed.

    Sizes are timed from 1 upwards, the best of ``repeats`` tries (the minimum is the least disturbed by other
    processes); timing stops once two sizes in a row are clearly slower than the best, so that a population
    of large members is not timed in its slowest, largest chunks.
    Gradients are computed and thrown away: parameters and optimizer state are untouched.
    """
    if x.device.type == "cuda" or model.size == 1:
        return model.size, {}
    timings: dict[int, float] = {}
    for chunk in chunk_candidates(model.size):
        timings[chunk] = _seconds_per_member(model, chunk, x, y, repeats)
        # Past the sizes where fusing pays, larger chunks only get slower and cost more to time: stop after
        # two in a row that are clearly (10%) slower than the best so far.
        slower = [timings[c] > 1.1 * min(timings.values()) for c in list(timings)[-2:]]
        if len(slower) == 2 and all(slower):
            break
    best = min(timings, key=timings.__getitem__)
    # Where fusing gains little the timings are within their noise of each other: there a member at a time
    # (what a single run costs) is the safe choice. Fusing must win by FUSING_MARGIN to be chosen; where it
    # pays, it wins 2-20x.
    if timings[best] > (1 - FUSING_MARGIN) * timings[1]:
        best = 1
    model.chunk = best
    return best, timings
