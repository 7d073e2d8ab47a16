"""One training run, assembled from its parts: dist -> data -> model -> trainer -> results.

Each arrow is a plain call with explicit inputs. Only rank 0 writes to the run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dtrain import dist
from dtrain.config import Config, as_yaml, to_plain
from dtrain.data import ShardedBatches, build_dataset
from dtrain.models import build_model
from dtrain.models.graph import GraphModel
from dtrain.train.logger import RunLogger
from dtrain.train.trainer import TrainResult, fit, param_dtype

log = logging.getLogger("dtrain")
_UMASK = os.umask(0)
os.umask(_UMASK)


def agree_on_run_dir(local: Path, env: dist.DistEnv) -> Path:
    """Every rank uses rank 0's run directory.

    On one node all ranks compute the same name already (see :func:`dist.launch_id`); across nodes
    that did not share a ``--rdzv-id`` they may not, so rank 0's choice wins and a rank that made
    an empty directory of its own removes it.
    """
    chosen = Path(dist.broadcast_str(str(local.resolve()), env))
    if chosen != local.resolve():
        with contextlib.suppress(OSError):
            local.rmdir()  # only succeeds if this rank's directory is empty
    return chosen


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flat_hparams(config: Config) -> dict[str, Any]:
    """``section.key -> value`` for TensorBoard's HParams (lists and None become their ``str``)."""
    flat: dict[str, Any] = {}
    for section, values in to_plain(config).items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: Config, run_dir: Path) -> dict[str, Any]:
    """Train as ``config`` says, write the results into ``run_dir`` (rank 0), and return the final metrics."""
    env = dist.setup(config.trainer.device, config.dist.backend, config.dist.timeout_s)
    try:
        run_dir = agree_on_run_dir(run_dir, env)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        data = build_dataset(config.data, config.seed).to(env.device, param_dtype(config.trainer.precision))
        model = build_model(config.model, data)
        batches = ShardedBatches(
            data.train,
            config.trainer.batch_size,
            env.rank,
            env.world_size,
            config.seed,
            config.trainer.grad_accum_steps,
        )
        torch.manual_seed(config.seed + 1 + env.rank)  # per-rank stream for dropout

        # Every check of the user's input has passed: only now is the run directory touched.
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "config.yaml", as_yaml(config).encode())
            log.info("run directory: %s (world size %d, %s)", run_dir, env.world_size, env.device)

        logger = RunLogger(run_dir, env.is_main, config.trainer.progress)
        try:
            logger.text("config", "```\n" + as_yaml(config) + "\n```")
            result = fit(model, data, batches, config.trainer, config.optim, config.schedule, env, logger)
            summary = results_summary(result, env.world_size)
            logger.hparams(flat_hparams(config), {k: v for k, v in summary.items() if isinstance(v, float)})
        finally:
            logger.close()
        if env.is_main:
            write_atomic(run_dir / "metrics.json", metrics_json(summary).encode())
            if result.status == "completed":  # a diverged model's weights are not worth keeping
                write_atomic(run_dir / "model.pt", _state_bytes(model))
                if isinstance(model, GraphModel):  # the engine's graph, for Graphviz (docs/graph.md)
                    batch = data.train.x[:64], data.train.y[:64]
                    write_atomic(run_dir / "graph.dot", model.to_dot(*batch).encode())
        dist.barrier(env)
        return summary | {"_message": result.message, "_run_dir": str(run_dir)}
    finally:
        dist.teardown(env)


def results_summary(result: TrainResult, world_size: int) -> dict[str, Any]:
    """``metrics.json``: final metrics under their TensorBoard tags, plus the run's bookkeeping."""
    summary: dict[str, Any] = dict(sorted(result.metrics.items()))
    summary.update(
        steps=result.steps,
        samples_per_sec=result.samples_per_sec,
        wall_time_s=result.wall_time_s,
        world_size=world_size,
        status=result.status,
    )
    return summary


def metrics_json(summary: dict[str, Any]) -> str:
    """Strict JSON: a non-finite value (a diverged loss) is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def _state_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()
