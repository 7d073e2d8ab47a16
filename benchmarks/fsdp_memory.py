"""What each rank holds under DDP and under FSDP: parameters, gradients and optimizer state, per rank.

Each case is a torchrun job of ``--world-sizes`` gloo ranks on the CPU. Every rank builds dtrain's MLP
(``--inputs`` inputs, ``--hidden`` layers of ``--width``, one output) in float32, wraps it with dtrain's own
strategy for ``trainer.strategy=ddp|fsdp`` (``dtrain.train.strategy.build_strategy``), builds dtrain's Adam on the
strategy's parameters, and takes ``--steps`` optimizer steps on random rows. Then it reports:

- the bytes of the parameters, gradients and optimizer state it holds (the local shards under FSDP), counted
  from the tensors themselves, and
- its resident memory after the steps, and its peak (``ru_maxrss``), above what it held before the model was
  built (after importing torch's FSDP modules): what the counts do not see (DDP's gradient buckets, FSDP's
  all-gathered units, the allocator) and, at the peak, the whole model each rank builds before it is sharded.

Usage: ``python benchmarks/fsdp_memory.py [--world-sizes 2 4] [--width 2048] [--hidden 4]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 1 << 20


def tensor_bytes(tensors) -> int:
    """The bytes of ``tensors``' local parts (a DTensor's shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp

    from dtrain import dist as dtrain_dist
    from dtrain.config import OptimConfig, TrainerConfig
    from dtrain.models.mlp import MLP
    from dtrain.optim import build_optimizer
    from dtrain.train.strategy import build_strategy

    env = dtrain_dist.setup("cpu", "gloo", 600.0, 600.0)
    gc.collect()
    before_mb, before_peak_kb = resident_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = MLP(num_inputs=args.inputs, hidden=[args.width] * args.hidden, num_outputs=1)
    mse = torch.nn.functional.mse_loss
    strategy = build_strategy(model, env, TrainerConfig(strategy=args.strategy), mse)
    params = [p for p in strategy.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(name="adam", lr=1e-4))
    generator = torch.Generator().manual_seed(env.rank)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.inputs, generator=generator)
        y = torch.randn(args.batch, 1, generator=generator)
        strategy.forward_backward([(x, y)], step + 1)
        optimizer.step()
        if step < args.steps - 1:
            optimizer.zero_grad(set_to_none=True)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    del model  # the strategy holds what trains
    gc.collect()
    after_mb = resident_mb()
    row = {
        "strategy": args.strategy,
        "world_size": env.world_size,
        "rank": env.rank,
        "parameters_mb": tensor_bytes(params) / MB,
        "gradients_mb": tensor_bytes(p.grad for p in params if p.grad is not None) / MB,
        "optimizer_mb": tensor_bytes(state) / MB,
        "whole_model_mb": sum(p.numel() * 4 for p in MLP(args.inputs, [args.width] * args.hidden, 1).parameters()) / MB,
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_peak_kb) / 1024,
        "rss_growth_mb": after_mb - before_mb,
    }
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(row))  # ranks' stdout lines can interleave
    dist.barrier()
    dtrain_dist.teardown(env)


def launch(args: argparse.Namespace, strategy: str, world: int) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    command += [__file__, "--worker", "--strategy", strategy]
    command += ["--width", str(args.width), "--hidden", str(args.hidden), "--inputs", str(args.inputs)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([*command, "--out", out], capture_output=True, text=True, env=env, check=False)
        rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    if done.returncode != 0 or len(rows) != world:
        raise SystemExit(f"{strategy} at {world} ranks failed:\n{done.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    columns = "parameters MB | gradients MB | optimizer MB | sum MB | of DDP's | RSS growth MB | peak RSS growth MB"
    print(f"| ranks | strategy | rank | {columns} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    whole = None
    for world in args.world_sizes:
        ddp_sum = None
        for strategy in ("ddp", "fsdp"):
            for row in launch(args, strategy, world):
                whole = row["whole_model_mb"]
                held = row["parameters_mb"] + row["gradients_mb"] + row["optimizer_mb"]
                if strategy == "ddp" and row["rank"] == 0:
                    ddp_sum = held
                share = f"{held / ddp_sum:.3f}" if ddp_sum else "-"
                sizes = f"{row['parameters_mb']:.1f} | {row['gradients_mb']:.1f} | {row['optimizer_mb']:.1f}"
                growth = f"{row['rss_growth_mb']:.0f} | {row['peak_rss_growth_mb']:.0f}"
                print(f"| {world} | {strategy} | {row['rank']} | {sizes} | {held:.1f} | {share} | {growth} |")
    print(f"\nthe whole model: {whole:.1f} MB of float32 parameters")


if __name__ == "__main__":
    main()
