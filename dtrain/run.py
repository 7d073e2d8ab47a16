"""One training run, assembled from its parts: dist -> data -> model -> trainer -> results.

Each arrow is a plain call with explicit inputs. Only rank 0 writes to the run directory. A population
(``population.size > 1``) is assembled by :mod:`dtrain.population.run` instead, after the same set-up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain import dist
from dtrain.atomic import write_atomic
from dtrain.config import Config, as_yaml, to_plain
from dtrain.data.dataloader import build_batches
from dtrain.data.fingerprint import data_fingerprint
from dtrain.data.registry import build_training_data
from dtrain.data.summary import data_summary, source_of
from dtrain.errors import PeerFailure, RankLocalError, UserError, first_line
from dtrain.faults import Faults
from dtrain.model_file import BEST, FINAL, model_record, save_model
from dtrain.models import build_initial_model, model_sizes
from dtrain.population.run import is_population, train_population
from dtrain.preemption import Preemption
from dtrain.results import RunResult, hparam_metrics, metrics_json
from dtrain.run_dir import agree_on_run_dir, open_run_dir
from dtrain.train.logger import RunLogger, log_to_rank_file, summary_table
from dtrain.train.metrics import ValMetrics
from dtrain.train.objective import build_loss, check_fit, check_objective
from dtrain.train.state import Checkpointer, Progress, prepare_resume
from dtrain.train.strategy import build_device, check_strategy, param_dtype
from dtrain.train.trainer import Trainer, TrainResult

log = logging.getLogger("dtrain")


def flat_hparams(config: Config) -> dict[str, Any]:
    """``section.key -> value`` for TensorBoard's HParams (lists and None become their ``str``)."""
    flat: dict[str, Any] = {}
    for section, values in to_plain(config).items():
        if not isinstance(values, dict):
            flat[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: Config, run_dir: Path) -> RunResult:
    """Train as ``config`` says, write the results into ``run_dir`` (rank 0), and say how it ended."""
    timeouts = config.dist.timeout_s, config.dist.checkpoint_timeout_s
    env = dist.setup(config.trainer.device, config.dist.backend, *timeouts)
    try:
        run_dir = agree_on_run_dir(run_dir, env)
        if is_population(config):
            return train_population(config, run_dir, env)
        return train_single(config, run_dir, env)
    except UserError as exc:
        if env.distributed and not isinstance(exc, RankLocalError):
            say_once(exc, env)
        raise
    except Exception as exc:
        if env.distributed and dist.collective_failure(exc):
            first = first_line(exc)
            raise PeerFailure(
                f"rank {env.rank}: {dist.current_op()} failed ({first}): another rank died or stopped answering "
                f"(see its messages); if it is only slow, raise dist.timeout_s={config.dist.timeout_s:g}"
            ) from exc
        raise
    finally:
        dist.teardown(env)


def split_file(rows: dict[str, torch.Tensor]) -> bytes:
    """``split.npz``: the row numbers (0-based, in the source's order) of the training and the validation split."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: part.cpu().numpy() for name, part in rows.items()})
    return buffer.getvalue()


def say_once(exc: UserError, env: dist.DistEnv) -> None:
    """A mistake every rank found alike: rank 0 says it now and the others wait for that before they exit, since
    torchrun stops every worker at the first exit and could cut rank 0 off before it speaks. ``exc.said`` tells
    the entry point it was said."""
    if env.is_main:
        print(f"dtrain: error: {exc}", file=sys.stderr, flush=True)
    exc.said = True  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):  # a rank that died is reported by torchrun; nothing to add here
        dist.barrier(env)


def train_single(config: Config, run_dir: Path, env: dist.DistEnv) -> RunResult:
    """One model trained data-parallel over every rank."""
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    dtype = param_dtype(config.trainer.precision)
    reduce = lambda t: dist.all_reduce_sum(t.to(env.device), env).cpu()  # noqa: E731 (the statistics' sums)
    data, standardizer = build_training_data(config.data, config.seed, env.rank, env.world_size, reduce)
    data = data.to(env.device, dtype)
    preprocessing = standardizer.state() if standardizer is not None else {}
    if data.classes is not None:  # data.labels=remap: the label each class index stands for, for predictions
        preprocessing["classes"] = data.classes
    if data.features is not None:  # a table's input columns: predict picks them by name, in this order
        preprocessing["features"] = data.features
    preprocessing = preprocessing or None
    sizes = model_sizes(config, data)
    loss = build_loss(config.loss, data.task, data.num_classes)
    metrics = ValMetrics(config.metrics, sizes, loss)
    metrics.check(data.val, env.world_size)
    check_objective(config, data, metrics.names)
    model = build_initial_model(config, data)
    check_fit(model.to(build_device(config.trainer, env), dtype), loss, data, sizes)  # the user's model and loss
    check_strategy(model, config.trainer)  # FSDP cannot shard every model: say so before anything is written
    batches = build_batches(
        data.train,
        config.trainer.batch_size,
        env.rank,
        env.world_size,
        config.seed,
        config.trainer.grad_accum_steps,
        num_workers=getattr(config.data, "num_workers", 0),  # a DataLoader's (data read from disk)
    )
    torch.manual_seed(config.seed + 1 + env.rank)  # per-rank stream for dropout
    plain = to_plain(config)
    # Rank 0's view of the data files, so that ranks on nodes with their own copies agree on one.
    fingerprint = dist.broadcast_str(data_fingerprint(config.data) or "" if env.is_main else "", env)
    if fingerprint:
        plain["data"]["fingerprint"] = fingerprint  # kept in the checkpoints, compared on resume
    resumed = prepare_resume(config.resume, run_dir, config.checkpoint, plain, env)

    # Every check of the user's input has passed: only now is the run directory touched.
    open_run_dir(run_dir, config, env, fresh=resumed is None)
    summary_line = data_summary(data, source_of(config.data), env.world_size, batches.global_batch, standardizer)
    if env.is_main:
        log.info("run directory: %s (world size %d, %s)", run_dir, env.world_size, env.device)
        log.info("%s", summary_line)
        if resumed is None and (rows := data.source_rows()) is not None:
            write_atomic(run_dir / "split.npz", split_file(rows))
    else:
        log_to_rank_file(run_dir, env.rank)
        log.info("rank %d of %d on %s, run directory %s", env.rank, env.world_size, env.device, run_dir)

    # A resumed run re-logs the steps after its checkpoint: TensorBoard drops the crashed attempt's copies.
    purge_step = resumed.step + 1 if resumed else None
    logger = RunLogger(run_dir, env.is_main, config.trainer.progress, purge_step=purge_step)
    record = model_record(config, sizes, dtype, preprocessing)  # what rebuilds the model from a checkpoint
    checkpointer = Checkpointer(run_dir, config.checkpoint, env, plain, resumed, record)
    try:
        if resumed is None:
            logger.text("config", "```\n" + as_yaml(config) + "\n```")
            logger.text("data", summary_line)
        with Preemption(env) as preemption:
            faults = Faults(config.fault, env.rank)

            def save_best(weights: dict[str, torch.Tensor] | None, step: int, val: dict[str, float]) -> None:
                if weights is not None:  # rank 0's
                    save_model(run_dir / BEST, weights, config, sizes, step, val, preprocessing)

            trainer = Trainer(
                model, data, batches, config, env, logger, checkpointer, faults, preemption, loss, metrics,
                save_best=save_best if config.checkpoint.save_best else None,
            )  # fmt: skip
            result = trainer.fit()
        summary = results_summary(result, env.world_size, trainer.progress if trainer.watch.active else None)
        summary["data"] = summary_line  # for dtrain report
        logger.hparams(flat_hparams(config), hparam_metrics(summary))
    finally:
        logger.close()
    # A diverged model's weights are not worth keeping. Gathering a sharded model's is a collective.
    weights = trainer.strategy.full_state() if result.status == "completed" else None
    if env.is_main:
        write_atomic(run_dir / "metrics.json", metrics_json(summary).encode())
        if weights is not None:
            save_model(run_dir / FINAL, weights, config, sizes, result.steps, result.metrics, preprocessing)
            batch = data.train.head(64)
            for name, text in trainer.strategy.run_files(*batch).items():  # the engine's graph.dot (docs/graph.md)
                write_atomic(run_dir / name, text.encode())
    dist.barrier(env)
    table = summary_table(summary, str(run_dir)) if env.is_main else ""
    return RunResult(result.status, run_dir, summary, message=result.message, table=table)


def results_summary(result: TrainResult, world_size: int, watched: Progress | None = None) -> dict[str, Any]:
    """``metrics.json``: final metrics under their TensorBoard tags, plus the run's bookkeeping; with the best
    model or early stopping (``watched``), the best evaluation's value and step, and where the run stopped."""
    summary: dict[str, Any] = dict(sorted(result.metrics.items()))
    if watched is not None:
        summary.update(best_value=watched.best_value, best_step=watched.best_step)
        summary.update(stopped_early=watched.stopped_early)
    summary.update(
        steps=result.steps,
        samples_per_sec=result.samples_per_sec,
        wall_time_s=result.wall_time_s,
        world_size=world_size,
        status=result.status,
    )
    return summary
