"""One training run, assembled from its parts: dist -> data -> model -> trainer -> results.

Each arrow is a plain call with explicit inputs. Only rank 0 writes to the run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from dtrain import checkpoint, dist
from dtrain.atomic import write_atomic
from dtrain.config import Config, ConfigError, as_yaml, to_plain
from dtrain.data import DataSet, ShardedBatches, build_dataset
from dtrain.errors import PeerFailure, UserError
from dtrain.faults import Faults
from dtrain.models import build_model
from dtrain.models.graph import GraphModel
from dtrain.preemption import Preemption
from dtrain.results import finite_or_none
from dtrain.train.logger import RunLogger, log_to_rank_file
from dtrain.train.objective import metric_names, val_tag
from dtrain.train.state import Checkpointer, prepare_resume
from dtrain.train.trainer import TrainResult, fit, param_dtype

log = logging.getLogger("dtrain")


def agree_on_run_dir(local: Path, env: dist.DistEnv) -> Path:
    """Every rank uses rank 0's run directory.

    On one node all ranks compute the same name already (see :func:`launch_env.launch_id`); across nodes
    that did not share a ``--rdzv-id`` they may not, so rank 0's choice wins and a rank that made
    an empty directory of its own removes it.
    """
    chosen = Path(dist.broadcast_str(str(local.resolve()), env))
    if chosen != local.resolve():
        with contextlib.suppress(OSError):
            local.rmdir()  # only succeeds if this rank's directory is empty
    return chosen


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
    timeouts = config.dist.timeout_s, config.dist.checkpoint_timeout_s
    env = dist.setup(config.trainer.device, config.dist.backend, *timeouts)
    try:
        return _train(config, run_dir, env)
    except Exception as exc:
        if env.distributed and dist.collective_failure(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerFailure(
                f"rank {env.rank}: {dist.current_op()} failed ({first}): another rank died or stopped answering "
                f"(see its messages); if it is only slow, raise dist.timeout_s={config.dist.timeout_s:g}"
            ) from exc
        raise
    finally:
        dist.teardown(env)


def _train(config: Config, run_dir: Path, env: dist.DistEnv) -> dict[str, Any]:
    run_dir = agree_on_run_dir(run_dir, env)
    # Imported here: the population's modules build on this one's helpers.
    from dtrain.population.run import is_population, train_population

    if is_population(config):
        return train_population(config, run_dir, env)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    data = build_dataset(config.data, config.seed).to(env.device, param_dtype(config.trainer.precision))
    check_objective(config, data)
    model = build_initial_model(config, data)
    batches = ShardedBatches(
        data.train,
        config.trainer.batch_size,
        env.rank,
        env.world_size,
        config.seed,
        config.trainer.grad_accum_steps,
    )
    torch.manual_seed(config.seed + 1 + env.rank)  # per-rank stream for dropout
    plain = to_plain(config)
    resumed = prepare_resume(config.resume, run_dir, config.checkpoint, plain, env)

    # Every check of the user's input has passed: only now is the run directory touched.
    open_run_dir(run_dir, config, env, fresh=resumed is None)
    if env.is_main:
        log.info("run directory: %s (world size %d, %s)", run_dir, env.world_size, env.device)
    else:
        log_to_rank_file(run_dir, env.rank)
        log.info("rank %d of %d on %s, run directory %s", env.rank, env.world_size, env.device, run_dir)

    # A resumed run re-logs the steps after its checkpoint: TensorBoard drops the crashed attempt's copies.
    purge_step = resumed.step + 1 if resumed else None
    logger = RunLogger(run_dir, env.is_main, config.trainer.progress, purge_step=purge_step)
    checkpointer = Checkpointer(run_dir, config.checkpoint, env, plain, resumed)
    try:
        if resumed is None:
            logger.text("config", "```\n" + as_yaml(config) + "\n```")
        with Preemption(env, config.checkpoint.signal_check_every) as preemption:
            faults = Faults(config.fault, env.rank)
            sections = config.trainer, config.optim, config.schedule
            result = fit(model, data, batches, *sections, env, logger, checkpointer, faults, preemption)
        summary = results_summary(result, env.world_size)
        logger.hparams(flat_hparams(config), hparam_metrics(summary))
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


def check_objective(config: Config, data: DataSet) -> None:
    """Refuse, before any training, an ``objective.metric`` this run will not produce (a typo would otherwise
    score every trial and member as the worst, silently)."""
    metric = config.objective.metric
    if metric == "auto":
        return
    produced = ["train/loss", "lr", "grad_norm/total"]
    produced += [val_tag(name, suffix) for suffix in data.val for name in metric_names(data.task)]
    if metric not in produced:
        raise ConfigError(f"objective.metric={metric!r} is not a metric of this run; it has: {', '.join(produced)}")


def build_initial_model(config: Config, data: DataSet) -> torch.nn.Module:
    """The model with its initial weights, drawn from ``init_seed`` (or ``seed``): the same on every rank."""
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    return build_model(config.model, data)


def open_run_dir(run_dir: Path, config: Config, env: dist.DistEnv, fresh: bool) -> None:
    """Rank 0 prepares the run directory (:func:`prepare_run_dir`); an ``OSError`` there is one line on every rank."""
    error = ""
    if env.is_main:
        try:
            prepare_run_dir(run_dir, config, fresh)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = f"cannot write the run directory {run_dir}: {reason}; choose another with hydra.run.dir=..."
    if error := dist.first_error(error, env):
        raise UserError(error)


def prepare_run_dir(run_dir: Path, config: Config, fresh: bool) -> None:
    """Create the run directory (rank 0). A fresh run writes its config.yaml; ``resume=never`` with
    ``checkpoint.overwrite=true`` deletes the earlier run's checkpoints. A resumed run keeps its config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume == "never" and config.checkpoint.overwrite:
        checkpoint.remove_all(run_dir)
    if fresh or not (run_dir / "config.yaml").exists():
        write_atomic(run_dir / "config.yaml", as_yaml(config).encode())


def hparam_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The final metrics the HParams dashboard compares runs by: losses, accuracies, throughput, time."""
    keep = ("train/", "val/")
    return {
        k: v
        for k, v in summary.items()
        if isinstance(v, float) and (k.startswith(keep) or k in ("samples_per_sec", "wall_time_s"))
    }


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
    return json.dumps(finite_or_none(summary), indent=2, allow_nan=False) + "\n"


def _state_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()
