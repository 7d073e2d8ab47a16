"""Training throughput of dtrain against two hand-written DDP loops, on the same MLP, data and steps.

Three ways to train one model (an MLP with hidden layers [64, 64] on ``poly1d``, float32, SGD,
a global batch of 256, a fixed number of optimizer steps, the same seed), each timed over its
training loop (start-up excluded):

``dtrain``
    The real command line: ``python -m dtrain ...`` for one process, ``torchrun --standalone
    --nproc_per_node=N -m dtrain ...`` for N ranks. The figure is ``samples_per_sec`` from the run
    directory's ``metrics.json``: optimizer steps x global batch / wall time of ``fit``'s loop, which
    starts after the model, DDP wrapper, optimizer and batches are built and leaves out the time spent
    evaluating. Start-up (imports, Hydra, process group) is not counted.
``dataloader``
    The pytorch/examples way: ``TensorDataset`` + ``DataLoader`` + ``DistributedSampler``
    (``set_epoch`` every epoch), a DDP-wrapped ``nn.Sequential`` MLP of the same shape.
``in-memory``
    Tensors indexed by a per-epoch ``randperm`` (no DataLoader), DDP-wrapped when world size > 1.

The hand-written loops time the same region as dtrain: from just before the first step to the end of
training; the one evaluation that follows is not timed (dtrain is configured with ``trainer.eval_every``
equal to the number of steps, so it evaluates exactly once, at the last step). Every measurement runs in a fresh
process with ``OMP_NUM_THREADS=1`` (what torchrun gives each worker), repeats ``--repeats`` times
interleaved, and the median is reported. A measurement is taken again if it fails or if other processes
used the CPU while it ran (the script reports how often that happened).

Usage, from the repository root (about two minutes on a 2-core CPU)::

    python benchmarks/ddp_throughput.py [--world-sizes 1 2] [--steps 300] [--repeats 3] [--out table.md]

The script launches itself (``--worker dataloader|in-memory``) for the hand-written loops, under
torchrun when the world size is above one.
"""

from __future__ import annotations

import argparse
import gc
import json
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
VARIANTS = ("dtrain", "dataloader", "in-memory")
MAX_ATTEMPTS = 3  # runs of one measurement, if it fails or other processes disturb it
OTHER_LOAD_LIMIT = 0.2  # CPU cores that other processes may keep busy during an undisturbed run


@dataclass(frozen=True)
class Settings:
    """What every variant trains: the same data, model, optimizer, batch and number of steps."""

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


# ---------------------------------------------------------------------------------------------
# The hand-written loops (run inside worker processes)


def load_data(settings: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The poly1d training and validation tensors, in float32, exactly as dtrain builds them from the seed."""
    from dtrain.config import Poly1dConfig
    from dtrain.data import build_dataset

    data = build_dataset(Poly1dConfig(num_points=settings.num_points), settings.seed)
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

    Step ``k`` uses the global batch ``perm[k*B:(k+1)*B]`` and each rank its contiguous slice of it.
    """
    per_rank = settings.batch_size // world_size
    steps_per_epoch = len(x) // settings.batch_size  # the last partial batch is dropped
    step, epoch = 0, 0
    loss = torch.zeros(())
    while step < settings.steps:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed + epoch))
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


def measure(kind: str, settings: Settings, rank: int, world_size: int) -> dict[str, float]:
    """Build and train one hand-written variant on this rank; return its samples/s and losses."""
    x, y, x_val, y_val = load_data(settings)
    model: nn.Module = make_mlp(x.shape[1], settings)
    if world_size > 1:
        model = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    per_rank = settings.batch_size // world_size

    if kind == "dataloader":
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=settings.seed)
        loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True)
        started = time.perf_counter()
        train_loss = train_dataloader(model, optimizer, loader, sampler, settings.steps)
    else:
        started = time.perf_counter()
        train_loss = train_in_memory(model, optimizer, x, y, settings, rank, world_size)
    wall = time.perf_counter() - started  # training only, as dtrain's samples_per_sec
    val_loss = evaluate(model, x_val, y_val, rank, world_size)
    return {
        "samples_per_sec": settings.steps * settings.batch_size / wall,
        "wall_time_s": wall,
        "train_loss": train_loss,  # the last step's
        "val_loss": val_loss,
    }


def run_worker(kind: str, settings: Settings, result_path: Path) -> None:
    """One rank of a hand-written variant (under torchrun, or alone); rank 0 writes the result as JSON."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    result = measure(kind, settings, rank, world_size)
    if rank == 0:
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


def dtrain_command(world_size: int, settings: Settings, run_dir: Path) -> list[str]:
    """The dtrain command line for this benchmark (logging and progress out of the way, one evaluation)."""
    return [
        *launcher(world_size),
        "-m",
        "dtrain",
        "model=mlp",
        f"model.hidden=[{','.join(map(str, settings.hidden))}]",
        "data=poly1d",
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


def read_result(variant: str, world_size: int, settings: Settings, out: Path) -> dict[str, float]:
    """samples/s and the final validation loss of a finished run, from its output directory."""
    if variant != "dtrain":
        return json.loads((out / "result.json").read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["steps"] == settings.steps and metrics["world_size"] == world_size, metrics
    return {"samples_per_sec": metrics["samples_per_sec"], "val_loss": metrics["val/loss"]}


def run_once(variant: str, world_size: int, settings: Settings, scratch: Path) -> dict[str, float]:
    """Run one variant in fresh processes; return its samples/s and final validation loss.

    A run is repeated (up to ``MAX_ATTEMPTS`` times) if it fails (a gloo process group can abort at exit
    after a complete run; see the worker) or if other processes took CPU time while it ran: on a shared
    machine another job's load skews a CPU benchmark far more than any difference measured here.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_until_quiet()
        out = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{variant}-{world_size}-"))
        if variant == "dtrain":
            command = dtrain_command(world_size, settings, out / "run")
        else:
            worker = [str(Path(__file__).resolve()), f"--worker={variant}", f"--result={out / 'result.json'}"]
            command = [*launcher(world_size), *worker, *settings.as_args()]
        machine, ours, started = machine_cpu_seconds(), children_cpu_seconds(), time.monotonic()
        proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
        others = (machine_cpu_seconds() - machine - (children_cpu_seconds() - ours)) / elapsed
        if proc.returncode != 0:
            problem = f"exited with status {proc.returncode}"
        elif others > OTHER_LOAD_LIMIT:
            problem = f"shared the CPU with other processes ({others:.2f} cores busy)"
        else:
            return read_result(variant, world_size, settings, out) | {"attempts": attempt, "others": others}
        print(f"warning: {variant} (world size {world_size}) {problem}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return read_result(variant, world_size, settings, out) | {"attempts": MAX_ATTEMPTS, "others": others}


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


def report(
    results: dict[tuple[str, int], list[dict[str, float]]], world_sizes: list[int], settings: Settings, commit: str
) -> str:
    """The markdown tables: median samples/s per variant and world size, then dtrain's ratios."""
    median = {key: statistics.median(r["samples_per_sec"] for r in runs) for key, runs in results.items()}
    lines = [
        f"Machine: {machine()}. dtrain commit {commit}.",
        "",
        f"Settings: {settings.steps} steps, global batch {settings.batch_size}, MLP {list(settings.hidden)}, "
        f"poly1d {settings.num_points} points, SGD lr {settings.lr}, float32, seed {settings.seed}, OMP_NUM_THREADS=1.",
        "",
        "| variant | world size | samples/s (median) | all runs | final val loss |",
        "|---|---:|---:|---|---:|",
    ]
    for world_size in world_sizes:
        for variant in VARIANTS:
            runs = results[variant, world_size]
            every = ", ".join(f"{r['samples_per_sec']:,.0f}" for r in runs)
            val_loss = runs[0]["val_loss"]  # the same in every repeat: the runs are deterministic
            speed = median[variant, world_size]
            lines.append(f"| {variant} | {world_size} | {speed:,.0f} | {every} | {val_loss:.4f} |")
    repeated = sum(int(r["attempts"]) - 1 for runs in results.values() for r in runs)
    disturbed = sum(r["others"] > OTHER_LOAD_LIMIT for runs in results.values() for r in runs)
    if repeated:
        lines += ["", f"{repeated} run(s) failed or were disturbed by other processes and were run again."]
    if disturbed:
        lines += ["", f"Warning: {disturbed} measurement(s) shared the CPU with other processes in every attempt."]
    lines += ["", "| world size | dtrain / in-memory | dtrain / dataloader |", "|---:|---:|---:|"]
    for world_size in world_sizes:
        ours = median["dtrain", world_size]
        lines.append(
            f"| {world_size} | {ours / median['in-memory', world_size]:.3f} | "
            f"{ours / median['dataloader', world_size]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the flags; either run one worker or drive the whole benchmark."""
    parser = argparse.ArgumentParser(description="Training throughput of dtrain against hand-written DDP loops.")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="ranks per run (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant; the median is reported")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="global batch size")
    parser.add_argument("--num-points", type=int, default=Settings.num_points, help="poly1d data set size")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--worker", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(steps=args.steps, batch_size=args.batch_size, num_points=args.num_points, seed=args.seed)

    if args.worker:
        run_worker(args.worker, settings, args.result)
        return

    commit = git_commit()
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ddp-throughput-") as scratch:
        # Repeats are interleaved so a slow spell of the machine does not land on one variant only.
        for repeat in range(args.repeats):
            for world_size in args.world_sizes:
                for variant in VARIANTS:
                    result = run_once(variant, world_size, settings, Path(scratch))
                    results.setdefault((variant, world_size), []).append(result)
                    print(
                        f"repeat {repeat + 1}/{args.repeats} world size {world_size} {variant}: "
                        f"{result['samples_per_sec']:,.0f} samples/s (other processes: {result['others']:.2f} cores)",
                        file=sys.stderr,
                        flush=True,
                    )
    if git_commit() != commit:  # dtrain changed while this ran
        commit = f"{commit}, changed to {git_commit()} during the run"
    table = report(results, args.world_sizes, settings, commit)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
