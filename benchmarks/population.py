"""Time a population of M members against the same M members trained one after another.

The models: ``mlp`` (2 -> 64 -> 64 -> 1, ReLU, 4,353 parameters) and ``polynomial`` (the original example's
5 coefficients), full-batch SGD on the 2-input surface at 256 or 4096 points drawn uniformly from [-2, 2]^2.
Every member has its own learning rate (a log range), so no two members compute the same thing.

``sequential``
    each member alone, as the strongest single run would train it: a ``dtrain.models`` module, ``F.mse_loss``,
    ``loss.backward()``, ``torch.optim.SGD.step`` and ``zero_grad``, for all of its steps, then the next member.
``fused``
    dtrain's population loop (``dtrain.population.train.fit_population``) with every member in one chunk:
    one vmap'd forward and backward, per-member clipping bookkeeping, the batched SGD step.
``dtrain``
    the same loop with the chunk size dtrain picks by timing at start-up (``population.chunk=0``; the time
    spent picking is reported, not counted: a real run picks once).

The figure is the time per member-step, the median of ``--repeats`` blocks per variant, the variants taking
turns block by block; the speed-up is sequential / dtrain.
The script waits for the CPU to go quiet before each case and repeats a block (at most 3 attempts) if other
processes used more than 0.2 of a core while it ran (the guard of ``ddp_throughput.py``). torch uses
``--threads`` intra-op threads (default: torch's own choice, every core).

Usage, from the repository root (about 4 minutes on a 2-core CPU)::

    python benchmarks/population.py [--members 8 32 128] [--points 256 4096] [--repeats 3] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ddp_throughput import OTHER_LOAD_LIMIT, machine_cpu_seconds, wait_until_quiet  # noqa: E402

from dtrain import config as C  # noqa: E402
from dtrain.data.dataset import DataSet, Split  # noqa: E402
from dtrain.data.loader import ShardedBatches  # noqa: E402
from dtrain.models import build_model  # noqa: E402
from dtrain.population.chunking import pick_chunk  # noqa: E402
from dtrain.population.members import Member  # noqa: E402
from dtrain.population.run import build_stacked  # noqa: E402
from dtrain.population.train import fit_population  # noqa: E402
from dtrain.train.cadence import Cadence  # noqa: E402

MODELS = {
    "mlp": C.MLPConfig(hidden=[64, 64], activation="relu"),
    "polynomial": C.PolynomialConfig(degree=2),
}
MAX_ATTEMPTS = 3
T = TypeVar("T")


def surface(points: int) -> DataSet:
    """The original example's surface (coefficients and noise) at ``points`` uniform points of [-2, 2]^2."""
    gen = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(points, 2, generator=gen) - 2
    c = [1.5, -0.5, 0.0, -1.0, 2.0]
    clean = c[0] * x[:, 0] ** 2 + c[1] * x[:, 0] + c[2] * x[:, 1] ** 2 + c[3] * x[:, 1] + c[4]
    y = (clean + 0.2 * torch.randn(points, generator=gen)).unsqueeze(1)
    return DataSet(train=Split(x, y), val={}, task="regression")


def members_of(model: str, count: int, steps: int) -> list[Member]:
    """``count`` members of ``model``, learning rates from 1e-3 to 1e-2 (all stable on the surface)."""
    base = C.Config(
        model=MODELS[model],
        data=C.Poly2dConfig(val_fraction=0.0),
        optim=C.OptimConfig(name="sgd"),
        schedule=C.ScheduleConfig(),
        trainer=C.TrainerConfig(max_epochs=steps, log_every=steps, progress="off", figures=False),
    )
    rates = [1e-3 * 10 ** (i / max(1, count - 1)) for i in range(count)]
    return [
        Member(i, {"optim.lr": lr}, C.Config(**{**base.__dict__, "optim": C.OptimConfig(name="sgd", lr=lr)}))
        for i, lr in enumerate(rates)
    ]


def sequential(members: list[Member], data: DataSet, steps: int) -> float:
    """Seconds to train every member alone, one after another (after one untimed forward and backward each)."""
    models = []
    for member in members:
        torch.manual_seed(member.config.seed)
        models.append(build_model(member.config.model, data))
    x, y = data.train.x, data.train.y
    rates = [member.config.optim.lr for member in members]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m, lr in zip(models, rates, strict=True)]
    for model, optimizer in zip(models, optimizers, strict=True):  # warm-up, untimed (as the population's pick)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for model, optimizer in zip(models, optimizers, strict=True):
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def population(members: list[Member], data: DataSet, steps: int, chunk: int | None) -> tuple[float, int, float]:
    """Seconds for dtrain's population loop over ``steps`` steps, the chunk used, and seconds spent picking it."""
    stacked = build_stacked(members, data, torch.device("cpu"), torch.float32)
    batches = ShardedBatches(data.train, None, 0, 1, 0)
    picking = 0.0
    if chunk is None:
        started = time.perf_counter()
        pick_chunk(stacked, data.train.x, data.train.y)
        picking = time.perf_counter() - started
    else:
        stacked.chunk = chunk
    config = members[0].config
    cadence = Cadence.of(config, batches.steps_per_epoch)
    started = time.perf_counter()
    fit = fit_population(stacked, members, data, batches, cadence, config.trainer, "sgd", False, lambda s, v: None)
    elapsed = time.perf_counter() - started
    assert fit.total_steps == steps and all(s == "completed" for s in fit.status), fit.status
    return elapsed, stacked.chunk, picking


def timed(run: Callable[[], T]) -> T:
    """``run()``'s result, run again while other processes took more than OTHER_LOAD_LIMIT of a core."""
    for _ in range(MAX_ATTEMPTS):
        wait_until_quiet()
        machine, own = machine_cpu_seconds(), time.process_time()
        started = time.monotonic()
        result = run()
        elapsed = time.monotonic() - started
        others = (machine_cpu_seconds() - machine - (time.process_time() - own)) / elapsed
        if others <= OTHER_LOAD_LIMIT:
            return result
        print(f"warning: other processes used {others:.2f} cores; timing again", file=sys.stderr, flush=True)
    return result


def steps_for(model: str, points: int, count: int) -> int:
    """Steps per block: about a second of sequential work, at least 5."""
    per_member_step = {"mlp": 4e-7, "polynomial": 1.5e-7}[model] * points + 1.5e-4
    return max(5, min(200, math.ceil(1.0 / (per_member_step * count))))


def measure(model: str, data: DataSet, count: int, repeats: int) -> str:
    """One table row: the three variants on ``count`` members of ``model``."""
    points = len(data.train)
    members = members_of(model, count, steps_for(model, points, count))
    steps = members[0].config.trainer.max_epochs
    work = count * steps
    # The variants take turns, so that a slow spell of the machine hits them alike.
    seqs, fuseds, picked = [], [], []
    for _ in range(repeats):
        seqs.append(timed(lambda: sequential(members, data, steps)))
        fuseds.append(timed(lambda: population(members, data, steps, count))[0])
        picked.append(timed(lambda: population(members, data, steps, None)))
    seq, fused = statistics.median(seqs), statistics.median(fuseds)
    auto = statistics.median(p[0] for p in picked)
    chunk = statistics.mode(p[1] for p in picked)
    picking = statistics.median(p[2] for p in picked)
    return (
        f"| {model} | {points} | {count} | {1e3 * seq / work:.3f} | {1e3 * fused / work:.3f} | {chunk} | "
        f"{1e3 * auto / work:.3f} | {seq / auto:.2f}x | {picking:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--points", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    header = (
        "| model | points | M | sequential (ms/member-step) | fused (ms/member-step) | dtrain: chunk | "
        "dtrain (ms/member-step) | speed-up (sequential / dtrain) | picking the chunk (s) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = []
    for model in args.models:
        for points in args.points:
            data = surface(points)
            for count in args.members:
                rows.append(measure(model, data, count, args.repeats))
                print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    meta = (
        f"{datetime.date.today()}, dtrain at {commit.stdout.strip() or 'unknown'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    table = "\n".join([header, *rows])
    print(f"\n{meta}\n\n{table}")
    if args.out:
        args.out.write_text(f"{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
