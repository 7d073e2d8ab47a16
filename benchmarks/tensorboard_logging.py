"""What TensorBoard logging costs a small training step: dtrain's RunLogger against no logging at all.

The default run's step (``Polynomial(2, 2)`` on 720 rows, SGD) takes a fraction of a millisecond, so the
few hundred microseconds a logging step spends on TensorBoard show in the throughput. Each variant trains
the same model for ``--steps`` steps in one process with one thread and, every 10 steps, reads the loss
(the host sync every variant pays) and logs a training event of 22 scalars and a validation event of one,
as dtrain's loop does:

``none``
    no TensorBoard at all (the bare loop's cost);
``one by one``
    ``RunLogger`` handing each event to TensorBoard's writer at once (``HAND_OVER_EVERY_S = 0``);
``batched``
    ``RunLogger`` as shipped: events handed over in batches, every ``HAND_OVER_EVERY_S`` seconds.

The variants are interleaved over ``--repeats`` rounds; the table gives medians of ms per step.

Usage, from the repository root (about 40 seconds)::

    python benchmarks/tensorboard_logging.py [--steps 3000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dtrain.models import Polynomial
from dtrain.train import logger as run_logger

TRAIN_VALUES = {f"train/value_{i}": float(i) for i in range(22)}  # a logging step's scalars, as many as dtrain's
BATCHED_EVERY_S = run_logger.HAND_OVER_EVERY_S  # as shipped


def train(variant: str, steps: int, x: torch.Tensor, y: torch.Tensor, directory: Path) -> float:
    """Milliseconds per step of ``steps`` training steps, logging every 10 as ``variant`` says."""
    logger = None
    if variant != "none":
        run_logger.HAND_OVER_EVERY_S = 0.0 if variant == "one by one" else BATCHED_EVERY_S
        logger = run_logger.RunLogger(directory, enabled=True, progress="off")
    torch.manual_seed(0)
    model = Polynomial(num_inputs=2, degree=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(100):
        step()
    started = time.perf_counter()
    for i in range(1, steps + 1):
        loss = step()
        if i % 10 == 0:
            loss.item()
            if logger is not None:
                logger.scalars(i, TRAIN_VALUES)
                logger.scalars(i, {"val/loss": 1.0})
    elapsed = time.perf_counter() - started
    if logger is not None:
        logger.close()
    return 1e3 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = torch.randn(720, 2), torch.randn(720, 1)
    variants = ("none", "one by one", "batched")
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for v in variants:
                times[v].append(train(v, args.steps, x, y, Path(tmp) / f"{r}-{v}"))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.repeats} rounds")
    print("| variant | ms per step (median) | extra over none | all rounds |")
    print("|---|---:|---:|---|")
    base = statistics.median(times["none"])
    for v in variants:
        median = statistics.median(times[v])
        shown = ", ".join(f"{t:.3f}" for t in times[v])
        print(f"| {v} | {median:.3f} | {median - base:+.3f} | {shown} |")


if __name__ == "__main__":
    main()
