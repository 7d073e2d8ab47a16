"""Training throughput of dtrain against hand-written DDP loops: the same model, data, steps and seed.

Two cases, each trained by dtrain's real command line and by loops written by hand, in float32 with SGD:

``mlp``
    An MLP with hidden layers [64, 64] on ``poly1d`` (5000 points, 4000 for training), lr 0.01, a global
    batch of 256 (``--steps``, default 300, optimizer steps). dtrain logs and evaluates once, at the end
    (``trainer.log_every`` larger than the run, ``trainer.eval_every`` equal to it). Four variants:

    ``dtrain``
        ``python -m dtrain model=mlp data=poly1d ...``.
    ``dtrain-dataloader``
        The same rows as ``Dataset``s (``data._target_=benchmarks.ddp_throughput.poly1d_datasets``), which dtrain
        reads through its DataLoader path (``data.num_workers=0``, as the hand-written DataLoader loop): the same
        batches, so it ends with dtrain's weights.
    ``dataloader``
        The pytorch/examples way: ``TensorDataset`` + ``DataLoader`` + ``DistributedSampler``
        (``set_epoch`` every epoch) and an ``nn.Sequential`` MLP of the same shape. Its sampler seeds each
        epoch's permutation with ``seed + epoch`` (dtrain with ``seed * 1000003 + epoch``): for seed 0 the
        global batches are dtrain's, divided among the ranks differently (strided, not contiguous), so the
        weights end equal up to rounding; for other seeds the batches differ.
    ``in-memory``
        The bare loop: tensors indexed by dtrain's per-epoch permutation (no DataLoader), each rank taking
        its contiguous slice of the global batch. It ends with dtrain's weights.

``polynomial``
    dtrain's default run: its own ``Polynomial(num_inputs=2, degree=2)`` (five scalar coefficients) on
    ``poly2d`` (a 30 x 30 grid: 720 training and 180 validation points), the full batch every step
    (each rank its contiguous shard of the training rows), lr 0.01, ``--poly-steps`` (default 2000) steps.
    Here the trainer's own per-step cost weighs the most. Two variants:

    ``dtrain``
        ``python -m dtrain model=polynomial data=poly2d trainer.batch_size=null ...`` with its defaults
        otherwise: it syncs with the host to log every ``trainer.log_every=10`` steps and evaluates at the end
        of each epoch, no more often than every 10 steps (one step is an epoch here). Figures, progress
        output and periodic checkpoints are off.
    ``full-batch``
        The bare loop: the very same ``Polynomial`` class and initial weights, DDP-wrapped for more than one
        rank, reading the loss on the host (``loss.item()``) every 10 steps, as nanoGPT's loop does at its log
        interval. It does not evaluate inside its timed region and ends with dtrain's weights.

How time is counted: only the training loop, start-up excluded. dtrain's figure is ``samples_per_sec``
from the run directory's ``metrics.json``: optimizer steps x global batch / time of ``fit``'s loop, which
starts after the model, DDP wrapper, optimizer and batches are built and leaves out the time spent
evaluating and checkpointing. Imports, Hydra and the process group are not counted. The hand-written loops
time the same region: from just before the first step to the end of training; their one evaluation that
follows is not timed. The ms/step columns are that training time divided by the steps.

Every measurement runs in fresh processes with ``OMP_NUM_THREADS=1`` (what torchrun gives each worker),
under ``torchrun --standalone`` (gloo) for world sizes above one. Each of the ``--repeats`` repeats runs
every case, variant and world size once, interleaved (the variants' order reversed on every other repeat),
so a slow spell of the machine does not land on one variant only; the tables give medians. A
measurement waits for a quiet CPU and is taken again if it fails or if other processes used the CPU while
it ran (the script reports how often that happened; ``--no-quiet-wait`` skips both, for smoke tests only).

dtrain / bare, in the summary, is the *median of the per-repeat ratios*: in each repeat dtrain's samples/s
over the bare loop's (``in-memory`` for mlp, ``full-batch`` for polynomial) of the same world size, both
measured minutes apart at most; the median over the repeats. Likewise "extra ms/step" is the median of the
per-repeat differences in ms a step. Targets: polynomial >= 0.95 (one process) and >= 0.90 (two ranks),
mlp >= 0.97 and >= 0.95. The sanity columns: each variant's final validation loss, and the largest
absolute difference between its final weights and dtrain's (0 up to rounding for the bare loops).

Usage, from the repository root (about 12 minutes with the defaults on an idle 2-core CPU, 50 runs of
which most of the time is the processes' start-up; longer when it has to wait for other processes)::

    python benchmarks/ddp_throughput.py [--cases mlp polynomial] [--world-sizes 1 2] [--steps 300]
        [--poly-steps 2000] [--repeats 5] [--out table.md]

The script launches itself (``--worker dataloader|in-memory|full-batch``) for the hand-written loops,
under torchrun when the world size is above one.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

REPO = Path(__file__).resolve().parent.parent
CASES = ("mlp", "polynomial")
VARIANTS = {"mlp": ("dtrain", "dtrain-dataloader", "dataloader", "in-memory"), "polynomial": ("dtrain", "full-batch")}
DTRAIN_VARIANTS = ("dtrain", "dtrain-dataloader")  # trained by dtrain's command line
BARE = {"mlp": "in-memory", "polynomial": "full-batch"}  # the bare loop each case's dtrain is compared with
TARGETS = {("mlp", 1): 0.97, ("mlp", 2): 0.95, ("polynomial", 1): 0.95, ("polynomial", 2): 0.90}
WORKERS = ("dataloader", "in-memory", "full-batch")
MAX_ATTEMPTS = 3  # runs of one measurement, if it fails or other processes disturb it
OTHER_LOAD_LIMIT = 0.2  # CPU cores that other processes may keep busy during an undisturbed run


@dataclass(frozen=True)
class Settings:
    """What every variant of the mlp case trains: the same data, model, optimizer, batch and number of steps."""

    steps: int = 300
    batch_size: int = 256  # global: split evenly across ranks
    num_points: int = 5000  # poly1d points; 20% are held out for validation
    hidden: tuple[int, ...] = (64, 64)
    lr: float = 0.01
    seed: int = 0

    def as_args(self) -> list[str]:
        """The command-line flags that recreate these settings in a worker process."""
        return [
            f"--steps={self.steps}",
            f"--batch-size={self.batch_size}",
            f"--num-points={self.num_points}",
            f"--seed={self.seed}",
        ]


@dataclass(frozen=True)
class PolySettings:
    """What both variants of the polynomial case train: dtrain's default model and data, the full batch."""

    steps: int = 2000
    degree: int = 2
    lr: float = 0.01
    log_every: int = 10  # steps between host syncs of the loss (dtrain's default trainer.log_every)
    seed: int = 0

    def as_args(self) -> list[str]:
        """The command-line flags that recreate these settings in a worker process (the seed is Settings')."""
        return [f"--poly-steps={self.steps}"]


# ---------------------------------------------------------------------------------------------
# The hand-written loops (run inside worker processes)


def load_data(settings: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The poly1d training and validation tensors, in float32, exactly as dtrain builds them from the seed."""
    from dtrain.config import Poly1dConfig
    from dtrain.data import build_dataset

    data = build_dataset(Poly1dConfig(num_points=settings.num_points), settings.seed)
    train, val = data.train, data.val[""]
    return train.x.float(), train.y.float(), val.x.float(), val.y.float()


def poly1d_datasets(num_points: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """dtrain's poly1d rows (its own split) as two Datasets: what the ``dtrain-dataloader`` variant trains on."""
    from dtrain.config import Poly1dConfig
    from dtrain.data import build_dataset

    data = build_dataset(Poly1dConfig(num_points=num_points), seed)
    return TensorDataset(data.train.x, data.train.y), TensorDataset(data.val[""].x, data.val[""].y)


def load_poly2d(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The poly2d training and validation tensors (default grid), in float32, as dtrain builds them."""
    from dtrain.config import Poly2dConfig
    from dtrain.data import build_dataset

    data = build_dataset(Poly2dConfig(), seed)
    train, val = data.train, data.val[""]
    return train.x.float(), train.y.float(), val.x.float(), val.y.float()


def make_mlp(num_inputs: int, settings: Settings) -> nn.Module:
    """Linear-ReLU blocks and a linear head: dtrain's MLP, with the same initial weights for the same seed."""
    torch.manual_seed(settings.seed)
    layers: list[nn.Module] = []
    fan_in = num_inputs
    for width in settings.hidden:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


def make_polynomial(num_inputs: int, settings: PolySettings) -> nn.Module:
    """dtrain's own Polynomial, drawn right after seeding as dtrain's ``build_initial_model`` does."""
    from dtrain.models.polynomial import Polynomial

    torch.manual_seed(settings.seed)
    return Polynomial(num_inputs, settings.degree)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int) -> float:
    """Mean squared error over the validation split, each rank taking a contiguous slice (one collective)."""
    start, stop = rank * len(x) // world_size, (rank + 1) * len(x) // world_size
    model.eval()
    with torch.no_grad():
        loss_sum = nn.functional.mse_loss(model(x[start:stop]), y[start:stop], reduction="sum")
        sums = torch.stack([loss_sum.double(), torch.tensor(stop - start, dtype=torch.float64)])
    model.train()
    if world_size > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def train_dataloader(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, sampler: DistributedSampler, steps: int
) -> float:
    """The pytorch/examples loop: iterate the DataLoader, ``set_epoch`` each epoch; return the last loss."""
    step, epoch = 0, 0
    loss = torch.zeros(())
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    return loss.item()


def train_in_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: Settings,
    rank: int,
    world_size: int,
) -> float:
    """Index the tensors with a per-epoch permutation shared by all ranks; return the last loss.

    Step ``k`` uses the global batch ``perm[k*B:(k+1)*B]`` and each rank its contiguous slice of it. The
    permutation is drawn from the same generator seed as dtrain's, so both see the same batches.
    """
    per_rank = settings.batch_size // world_size
    steps_per_epoch = len(x) // settings.batch_size  # the last partial batch is dropped
    step, epoch = 0, 0
    loss = torch.zeros(())
    while step < settings.steps:
        generator = torch.Generator().manual_seed((settings.seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(len(x), generator=generator)
        for k in range(steps_per_epoch):
            start = k * settings.batch_size + rank * per_rank
            idx = perm[start : start + per_rank]
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == settings.steps:
                break
        epoch += 1
    return loss.item()


def train_full_batch(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, settings: PolySettings
) -> float:
    """Every step on this rank's whole shard; the loss goes to the host every ``log_every`` steps (the log).

    Returns the last loss read.
    """
    last = math.nan
    for step in range(1, settings.steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % settings.log_every == 0 or step == settings.steps:
            last = loss.item()
    return last


def measure(
    kind: str, settings: Settings, poly: PolySettings, rank: int, world_size: int
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Build and train one hand-written variant on this rank; return its samples/s and losses, and its final
    weights (in state-dict order)."""
    if kind == "full-batch":
        x, y, x_val, y_val = load_poly2d(settings.seed)
        plain = make_polynomial(x.shape[1], poly)
        steps, batch_size, lr = poly.steps, len(x), poly.lr
    else:
        x, y, x_val, y_val = load_data(settings)
        plain = make_mlp(x.shape[1], settings)
        steps, batch_size, lr = settings.steps, settings.batch_size, settings.lr
    model = DDP(plain) if world_size > 1 else plain
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    per_rank = batch_size // world_size

    if kind == "dataloader":
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=settings.seed)
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True)
        started = time.perf_counter()
        train_loss = train_dataloader(model, optimizer, loader, sampler, steps)
    elif kind == "in-memory":
        started = time.perf_counter()
        train_loss = train_in_memory(model, optimizer, x, y, settings, rank, world_size)
    else:
        # The full batch in dtrain's order (no shuffling): rank r takes the r-th contiguous shard.
        shard_x, shard_y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        started = time.perf_counter()
        train_loss = train_full_batch(model, optimizer, shard_x, shard_y, poly)
    wall = time.perf_counter() - started  # training only, as dtrain's samples_per_sec
    val_loss = evaluate(model, x_val, y_val, rank, world_size)
    result = {
        "samples_per_sec": steps * batch_size / wall,
        "wall_time_s": wall,
        "train_loss": train_loss,  # the last one read
        "val_loss": val_loss,
    }
    return result, [v.detach().clone() for v in plain.state_dict().values()]


def run_worker(kind: str, settings: Settings, poly: PolySettings, result_path: Path) -> None:
    """One rank of a hand-written variant (under torchrun, or alone); rank 0 writes the result as JSON and
    the final weights beside it (``weights.pt``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    result, weights = measure(kind, settings, poly, rank, world_size)
    if rank == 0:
        torch.save(weights, result_path.with_name("weights.pt"))
        result_path.write_text(json.dumps(result) + "\n")
    if world_size > 1:
        # DDP sits in a reference cycle: collect it now, or it keeps the gloo group alive until interpreter
        # shutdown, where tearing the group down sometimes aborts the process.
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The driver: launch each variant in fresh processes and collect the figures


def launcher(world_size: int) -> list[str]:
    """``python`` for one process, ``torchrun --standalone --nproc_per_node=N`` (same interpreter) for N ranks."""
    if world_size == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]


def child_env() -> dict[str, str]:
    """One thread per process for every variant, and the repository importable from the worker script."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def dtrain_command(world_size: int, settings: Settings, run_dir: Path, datasets: bool = False) -> list[str]:
    """The dtrain command line of the mlp case (logging and progress out of the way, one evaluation); with
    ``datasets``, its rows come as Datasets and take dtrain's DataLoader path."""
    if datasets:
        module = __name__ if __name__ != "__main__" else "benchmarks.ddp_throughput"
        data = [f"data._target_={module}.poly1d_datasets", f"data.seed={settings.seed}"]
    else:
        data = ["data=poly1d"]
    return [
        *launcher(world_size),
        "-m",
        "dtrain",
        "model=mlp",
        f"model.hidden=[{','.join(map(str, settings.hidden))}]",
        *data,
        f"data.num_points={settings.num_points}",
        "optim=sgd",
        f"optim.lr={settings.lr}",
        f"seed={settings.seed}",
        "trainer.precision=float32",
        f"trainer.batch_size={settings.batch_size}",
        f"trainer.max_steps={settings.steps}",
        "trainer.max_epochs=1000000",
        f"trainer.eval_every={settings.steps}",
        "trainer.log_every=1000000",
        "trainer.progress=off",
        "trainer.device=cpu",
        "dist.backend=gloo",
        f"hydra.run.dir={run_dir}",
    ]


def poly_dtrain_command(world_size: int, poly: PolySettings, run_dir: Path) -> list[str]:
    """The dtrain command line of the polynomial case: the default run's model and data, the default logging
    and evaluation cadence, without figures, progress output or periodic checkpoints."""
    return [
        *launcher(world_size),
        "-m",
        "dtrain",
        "model=polynomial",
        f"model.degree={poly.degree}",
        "data=poly2d",
        "optim=sgd",
        f"optim.lr={poly.lr}",
        f"seed={poly.seed}",
        "trainer.precision=float32",
        "trainer.batch_size=null",
        f"trainer.max_steps={poly.steps}",
        "trainer.max_epochs=1000000",
        f"trainer.log_every={poly.log_every}",
        "trainer.progress=off",
        "trainer.figures=false",
        "trainer.device=cpu",
        "checkpoint.every_n_steps=0",
        "dist.backend=gloo",
        f"hydra.run.dir={run_dir}",
    ]


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, from /proc/stat (0 where that is missing)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        user, nice, system, _idle, _iowait, irq, softirq = fields
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (and the torchrun workers they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_quiet(patience_s: float = 30.0) -> None:
    """Wait (up to ``patience_s``) until other processes leave the CPU mostly idle."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        before = machine_cpu_seconds()
        time.sleep(1.0)
        if machine_cpu_seconds() - before < OTHER_LOAD_LIMIT:
            return


def load_weights(path: Path) -> torch.Tensor | None:
    """A run's final weights as one flat float64 vector (state-dict order), or None where they are missing."""
    if not path.exists():
        return None
    weights = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(weights, dict) and "state_dict" in weights:  # dtrain's model.pt: the weights inside
        weights = weights["state_dict"]
    tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def read_result(variant: str, world_size: int, steps: int, batch: int, out: Path) -> dict:
    """samples/s, ms a step, the final validation loss and weights of a finished run, from its output directory.

    ms a step is the training time (dtrain's: without evaluation) over the steps: the global batch over samples/s.
    """
    if variant not in DTRAIN_VARIANTS:
        result = json.loads((out / "result.json").read_text())
        result["weights"] = load_weights(out / "weights.pt")
    else:
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        assert metrics["steps"] == steps and metrics["world_size"] == world_size, metrics
        result = {"samples_per_sec": metrics["samples_per_sec"], "val_loss": metrics["val/loss"]}
        result["weights"] = load_weights(out / "run" / "model.pt")
    result["ms_per_step"] = 1e3 * batch / result["samples_per_sec"]
    return result


@functools.cache
def poly_batch(seed: int) -> int:
    """The polynomial case's global batch: all of poly2d's training rows."""
    return len(load_poly2d(seed)[0])


def run_once(
    case: str, variant: str, world_size: int, settings: Settings, poly: PolySettings, scratch: Path, quiet: bool
) -> dict:
    """Run one variant in fresh processes; return its samples/s, ms a step, final validation loss and weights.

    A run is repeated (up to ``MAX_ATTEMPTS`` times) if it fails (a gloo process group can abort at exit
    after a complete run; see the worker) or, with ``quiet``, if other processes took CPU time while it ran:
    on a shared machine another job's load skews a CPU benchmark far more than any difference measured here.
    ``quiet`` also waits for an idle CPU before each attempt.
    """
    steps, batch = (settings.steps, settings.batch_size) if case == "mlp" else (poly.steps, poly_batch(poly.seed))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if quiet:
            wait_until_quiet()
        out = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{case}-{variant}-{world_size}-"))
        if variant == "dtrain-dataloader":
            command = dtrain_command(world_size, settings, out / "run", datasets=True)
        elif variant == "dtrain" and case == "mlp":
            command = dtrain_command(world_size, settings, out / "run")
        elif variant == "dtrain":
            command = poly_dtrain_command(world_size, poly, out / "run")
        else:
            worker = [str(Path(__file__).resolve()), f"--worker={variant}", f"--result={out / 'result.json'}"]
            command = [*launcher(world_size), *worker, *settings.as_args(), *poly.as_args()]
        machine, ours, started = machine_cpu_seconds(), children_cpu_seconds(), time.monotonic()
        proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
        others = (machine_cpu_seconds() - machine - (children_cpu_seconds() - ours)) / elapsed
        if proc.returncode != 0:
            problem = f"exited with status {proc.returncode}"
        elif quiet and others > OTHER_LOAD_LIMIT:
            problem = f"shared the CPU with other processes ({others:.2f} cores busy)"
        else:
            return read_result(variant, world_size, steps, batch, out) | {"attempts": attempt, "others": others}
        print(f"warning: {case} {variant} (world size {world_size}) {problem}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return read_result(variant, world_size, steps, batch, out) | {"attempts": MAX_ATTEMPTS, "others": others}


def git_commit() -> str:
    """The last commit that changed dtrain/ or conf/, marked if they have local changes; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "dtrain", "conf")
        return git("log", "-1", "--format=%h", "--", "dtrain", "conf") + (" +local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """CPU model, core count and torch version, for the report."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


Results = dict[tuple[str, str, int], list[dict]]  # (case, variant, world size) -> one result per repeat


def paired(results: Results, case: str, variant: str, world_size: int) -> tuple[list[float], list[float]]:
    """Per repeat, dtrain's samples/s over ``variant``'s, and dtrain's ms a step minus ``variant``'s."""
    ours, theirs = results[case, "dtrain", world_size], results[case, variant, world_size]
    ratios = [a["samples_per_sec"] / b["samples_per_sec"] for a, b in zip(ours, theirs, strict=True)]
    extra = [a["ms_per_step"] - b["ms_per_step"] for a, b in zip(ours, theirs, strict=True)]
    return ratios, extra


def weight_difference(results: Results, case: str, variant: str, world_size: int) -> str:
    """The largest absolute difference between ``variant``'s final weights and dtrain's, over the repeats."""
    worst = 0.0
    for ours, theirs in zip(results[case, "dtrain", world_size], results[case, variant, world_size], strict=True):
        a, b = ours["weights"], theirs["weights"]
        if a is None or b is None or a.shape != b.shape:
            return "n/a"
        worst = max(worst, (a - b).abs().max().item())
    return f"{worst:.1e}"


def case_description(case: str, settings: Settings, poly: PolySettings) -> str:
    """One line: what the case trains."""
    if case == "mlp":
        return (
            f"MLP {list(settings.hidden)} on poly1d ({settings.num_points} points, 80% for training), global batch "
            f"{settings.batch_size}, {settings.steps} steps, SGD lr {settings.lr}, float32, seed {settings.seed}; "
            "dtrain logs and evaluates once, at the end."
        )
    return (
        f"Polynomial(num_inputs=2, degree={poly.degree}) on poly2d, full batch ({poly_batch(poly.seed)} training "
        f"rows), {poly.steps} steps, SGD lr {poly.lr}, float32, seed {poly.seed}; both read the loss every "
        f"{poly.log_every} steps, dtrain also evaluates every {poly.log_every} steps (not counted)."
    )


def report(
    results: Results,
    cases: list[str],
    world_sizes: list[int],
    settings: Settings,
    poly: PolySettings,
    commit: str,
    quiet: bool,
) -> str:
    """The markdown tables: per case, each variant's medians and sanity checks; then dtrain / bare loop against
    the targets."""
    lines = [f"Machine: {machine()}. dtrain commit {commit}. OMP_NUM_THREADS=1, gloo, one process per rank."]
    if not quiet:
        lines += ["", "Warning: run with --no-quiet-wait: other processes may have shared the CPU (a smoke test)."]
    for case in cases:
        lines += [
            "",
            f"Case `{case}`: {case_description(case, settings, poly)}",
            "",
            "| variant | world size | samples/s (median) | ms/step (median) | all runs (ms/step) | dtrain / this "
            "| final val loss | max abs weight diff vs dtrain |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for world_size in world_sizes:
            for variant in VARIANTS[case]:
                runs = results[case, variant, world_size]
                speed = statistics.median(r["samples_per_sec"] for r in runs)
                ms = statistics.median(r["ms_per_step"] for r in runs)
                every = ", ".join(f"{r['ms_per_step']:.3f}" for r in runs)
                val_loss = runs[0]["val_loss"]  # the same in every repeat: the runs are deterministic
                ratio = diff = ""
                if variant != "dtrain":
                    ratio = f"{statistics.median(paired(results, case, variant, world_size)[0]):.3f}"
                    diff = weight_difference(results, case, variant, world_size)
                lines.append(
                    f"| {variant} | {world_size} | {speed:,.0f} | {ms:.3f} | {every} | {ratio} | {val_loss:.6g} "
                    f"| {diff} |"
                )
    lines += [
        "",
        "dtrain / bare: the median over the repeats of dtrain's samples/s over the bare loop's of the same repeat "
        "(in-memory for mlp, full-batch for polynomial); extra ms/step: the median of the per-repeat differences.",
        "",
        "| case | world size | dtrain ms/step | bare ms/step | extra ms/step | dtrain / bare | target | met? |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for world_size in world_sizes:
            bare = BARE[case]
            ratios, extra = paired(results, case, bare, world_size)
            ratio = statistics.median(ratios)
            ours = statistics.median(r["ms_per_step"] for r in results[case, "dtrain", world_size])
            theirs = statistics.median(r["ms_per_step"] for r in results[case, bare, world_size])
            target = TARGETS.get((case, world_size))
            goal, met = ("n/a", "n/a") if target is None else (f">= {target:.2f}", "yes" if ratio >= target else "no")
            lines.append(
                f"| {case} | {world_size} | {ours:.3f} | {theirs:.3f} | {statistics.median(extra):+.3f} "
                f"| {ratio:.3f} | {goal} | {met} |"
            )
    repeated = sum(int(r["attempts"]) - 1 for runs in results.values() for r in runs)
    disturbed = sum(r["others"] > OTHER_LOAD_LIMIT for runs in results.values() for r in runs)
    if repeated:
        lines += ["", f"{repeated} run(s) failed or were disturbed by other processes and were run again."]
    if disturbed:
        what = "in every attempt" if quiet else "(not run again: --no-quiet-wait)"
        lines += ["", f"Warning: {disturbed} measurement(s) shared the CPU with other processes {what}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the flags; either run one worker or drive the whole benchmark."""
    parser = argparse.ArgumentParser(description="Training throughput of dtrain against hand-written DDP loops.")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="default: mlp polynomial")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="ranks per run (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant; medians are reported")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="optimizer steps of the mlp case")
    parser.add_argument("--poly-steps", type=int, default=PolySettings.steps, help="steps of the polynomial case")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="mlp case's global batch")
    parser.add_argument("--num-points", type=int, default=Settings.num_points, help="mlp case's poly1d points")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument(
        "--no-quiet-wait",
        action="store_true",
        help="neither wait for an idle CPU nor rerun disturbed measurements (smoke tests only)",
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(steps=args.steps, batch_size=args.batch_size, num_points=args.num_points, seed=args.seed)
    poly = PolySettings(steps=args.poly_steps, seed=args.seed)

    if args.worker:
        run_worker(args.worker, settings, poly, args.result)
        return

    quiet = not args.no_quiet_wait
    cases = [case for case in CASES if case in args.cases]
    commit = git_commit()
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="ddp-throughput-") as scratch:
        # Repeats are interleaved so a slow spell of the machine does not land on one variant only, and the
        # variants run in reverse order every other repeat so none always runs first.
        for repeat in range(args.repeats):
            for world_size in args.world_sizes:
                for case in cases:
                    variants = VARIANTS[case] if repeat % 2 == 0 else VARIANTS[case][::-1]
                    for variant in variants:
                        result = run_once(case, variant, world_size, settings, poly, Path(scratch), quiet)
                        results.setdefault((case, variant, world_size), []).append(result)
                        print(
                            f"repeat {repeat + 1}/{args.repeats} world size {world_size} {case} {variant}: "
                            f"{result['samples_per_sec']:,.0f} samples/s, {result['ms_per_step']:.3f} ms/step "
                            f"(other processes: {result['others']:.2f} cores)",
                            file=sys.stderr,
                            flush=True,
                        )
    if git_commit() != commit:  # dtrain changed while this ran
        commit = f"{commit}, changed to {git_commit()} during the run"
    table = report(results, cases, args.world_sizes, settings, poly, commit, quiet)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
