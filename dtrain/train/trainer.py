"""The training loop: forward, loss, backward (gradients all-reduced by DDP), clip, step, schedule.

It reads top to bottom, DDP included. It knows nothing of which model or data set it trains:
the caller passes a built model, an in-memory data set and the config sections it needs.
Host syncs happen only at logging and evaluation steps: on the other steps the loss accumulates
on the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import OptimConfig, ScheduleConfig, TrainerConfig
from dtrain.data.dataset import DataSet, Split
from dtrain.data.loader import ShardedBatches, shard_bounds
from dtrain.dist import DistEnv, all_reduce_mean_, all_reduce_sum
from dtrain.models.graph import GraphModel
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.train.grads import clip_gradients, grad_norms
from dtrain.train.logger import RunLogger
from dtrain.train.objective import loss_fn, metric_sums

log = logging.getLogger("dtrain")


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and data: float64 for ``float64``; float32 otherwise (bf16 autocasts on top)."""
    return torch.float64 if precision == "float64" else torch.float32


@dataclass
class TrainResult:
    status: str  # completed | diverged
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_sec: float = 0.0
    wall_time_s: float = 0.0
    message: str = ""


def evaluate(
    model: nn.Module,
    val: dict[str, Split],
    task: str,
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager],
    chunk: int,
) -> dict[str, float]:
    """Validation metrics over every rank's disjoint slice of each split, summed across ranks (one collective).

    Each slice is evaluated ``chunk`` rows at a time, so evaluation needs no more memory than training.
    """
    if not val:
        return {}
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    layout: list[tuple[str, list[str]]] = []
    with torch.no_grad():
        for suffix, split in val.items():
            start, stop = shard_bounds(len(split), env.rank, env.world_size)
            sums: dict[str, torch.Tensor] = {}
            for lo in range(start, max(stop, start + 1), chunk):  # an empty slice still yields zero sums
                hi = min(lo + chunk, stop)
                with autocast():
                    output = model(split.x[lo:hi])
                if output.dtype == torch.bfloat16:
                    output = output.float()
                for name, value in metric_sums(task, output, split.y[lo:hi]).items():
                    sums[name] = sums.get(name, 0) + value.to(torch.float64)
            layout.append((suffix, list(sums)))
            parts.extend(sums.values())
            parts.append(torch.tensor(float(stop - start), dtype=torch.float64, device=split.x.device))
    model.train(was_training)
    totals = all_reduce_sum(torch.stack(parts), env).tolist()
    metrics: dict[str, float] = {}
    i = 0
    for suffix, names in layout:
        count = totals[i + len(names)]
        for name in names:
            tag = f"val/{name}_{suffix}" if suffix else f"val/{name}"
            metrics[tag] = totals[i] / count
            i += 1
        i += 1
    return metrics


def fit(
    model: nn.Module,
    data: DataSet,
    batches: ShardedBatches,
    trainer: TrainerConfig,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    env: DistEnv,
    logger: RunLogger,
) -> TrainResult:
    """Train ``model`` on ``data`` (already on the device) in ``batches``; return how it ended.

    ``model`` holds the trained weights afterwards.
    """
    model.to(env.device, param_dtype(trainer.precision))
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]

    # Gradient sync: DDP all-reduces (averages) torch gradients during backward; the graph engine's
    # gradients are invisible to DDP, so they are averaged after backward in one bucketed all-reduce.
    # One process needs neither.
    engine = isinstance(model, GraphModel)
    ddp_model: nn.Module = model
    if env.distributed and not engine:
        ddp_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    forward_model = torch.compile(ddp_model) if trainer.compile else ddp_model

    def autocast() -> contextlib.AbstractContextManager:
        if trainer.precision == "bf16-mixed":
            return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    total_steps = batches.steps_per_epoch * trainer.max_epochs
    if trainer.max_steps is not None:
        total_steps = min(total_steps, trainer.max_steps)
    optimizer = build_optimizer(params, optim)
    per_epoch = schedule.interval == "epoch"
    # A constant rate without warmup never changes: skip stepping its scheduler.
    schedule_moves = schedule.name != "constant" or schedule.warmup > 0
    scheduler = build_scheduler(
        optimizer, schedule, math.ceil(total_steps / batches.steps_per_epoch) if per_epoch else total_steps
    )
    compute_loss = loss_fn(data.task)

    step = 0
    epoch = 0
    evaluated_at = -1
    metrics: dict[str, float] = {}
    # The loss accumulates on the device between logging steps: no host sync on ordinary steps. A
    # non-finite loss on any step makes the sum non-finite, so checking it at logging steps suffices.
    # Kept in the weights' dtype (float32 or float64): a dtype conversion every step costs measurably.
    loss_sum = torch.zeros((), dtype=param_dtype(trainer.precision), device=env.device)
    steps_since_log = 0
    started = last_log_time = time.perf_counter()
    # Throughput counts training only: evaluation time is measured and left out.
    eval_seconds = eval_since_log = 0.0
    status, message = "completed", ""

    def run_evaluation() -> None:
        nonlocal evaluated_at, eval_seconds, eval_since_log
        began = time.perf_counter()
        val = evaluate(model, data.val, data.task, env, autocast, chunk=batches.micro_batch)
        took = time.perf_counter() - began  # evaluate() ends in a host sync, so this is its real cost
        eval_seconds += took
        eval_since_log += took
        logger.scalars(step, val)
        metrics.update(val)
        evaluated_at = step

    model.train()
    while step < total_steps and status == "completed":
        for micro_batches in batches.epoch(epoch):
            if engine:
                # The engine computes loss and gradients itself; then one bucketed all-reduce.
                scale = 1.0 / len(micro_batches)
                for x, y in micro_batches:
                    loss = model.loss_and_backward(x, y, scale)
                    loss_sum += loss if scale == 1.0 else loss * scale
                all_reduce_mean_([p.grad for p in params], env)
            else:
                for i, (x, y) in enumerate(micro_batches):
                    last_micro = i == len(micro_batches) - 1
                    # Gradients of the accumulating micro-batches stay local; the last one all-reduces.
                    sync = contextlib.nullcontext() if last_micro or not env.distributed else ddp_model.no_sync()
                    with sync:
                        with autocast():
                            loss = compute_loss(forward_model(x), y)
                            if len(micro_batches) > 1:
                                loss = loss / len(micro_batches)
                        loss.backward()
                    loss_sum += loss.detach()
            step += 1
            steps_since_log += 1
            log_now = step % trainer.log_every == 0 or step == total_steps

            if log_now:  # per-parameter norms before clipping, for the dashboard
                norms, names = grad_norms(named_params)
            # A non-finite gradient under norm clipping turns the parameters, and so the next loss, non-finite.
            clip_gradients(params, trainer.clip_grad_value, trainer.clip_grad_norm)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used, which is what we log
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule_moves and not per_epoch:
                scheduler.step()

            if log_now:
                # One collective and one host sync for everything reduced across ranks. Gradient
                # norms need no reduction: after DDP's all-reduce every rank holds the same gradients.
                reduced = all_reduce_sum(torch.stack([loss_sum]), env)
                host = torch.cat([reduced.double(), norms.to(reduced.device)]).tolist()
                now = time.perf_counter()
                train_seconds = now - last_log_time - eval_since_log
                grad_total = math.sqrt(sum(v * v for v in host[1:]))
                values = {
                    "train/loss": host[0] / (steps_since_log * env.world_size),
                    "lr": step_lr,
                    "grad_norm/total": grad_total,
                    **{f"grad_norm/{n}": v for n, v in zip(names, host[1:], strict=True)},
                    "perf/samples_per_sec": steps_since_log * batches.global_batch / max(train_seconds, 1e-9),
                }
                logger.scalars(step, values)
                logger.progress_update(step, total_steps, epoch + 1, values)
                metrics.update(values)
                if not (math.isfinite(host[0]) and math.isfinite(grad_total)):
                    status = "diverged"
                    message = divergence_message(step, values, optim, trainer)
                    break
                loss_sum.zero_()
                steps_since_log = 0
                last_log_time = now
                eval_since_log = 0.0

            if trainer.eval_every and step % trainer.eval_every == 0:
                run_evaluation()
            if step >= total_steps:
                break

        if status == "completed" and step == (epoch + 1) * batches.steps_per_epoch:
            # A whole epoch ran: per-epoch schedules and end-of-epoch evaluation, but no more often
            # than every log_every steps (with one step an epoch, evaluating each epoch would sync each step).
            if schedule_moves and per_epoch:
                scheduler.step()
            if not trainer.eval_every and step - max(evaluated_at, 0) >= trainer.log_every:
                run_evaluation()
        epoch += 1

    if status == "completed" and evaluated_at != step:
        run_evaluation()  # the run stopped between evaluations (max_steps): evaluate the final model

    wall = time.perf_counter() - started
    return TrainResult(
        status=status,
        steps=step,
        metrics=metrics,
        samples_per_sec=step * batches.global_batch / max(wall - eval_seconds, 1e-9),
        wall_time_s=wall,
        message=message,
    )


def divergence_message(step: int, values: dict[str, float], optim: OptimConfig, trainer: TrainerConfig) -> str:
    """One line that says the run diverged, where, and what to try."""
    hint = f"lower the learning rate (optim.lr={optim.lr:g})"
    if trainer.clip_grad_norm is None and trainer.clip_grad_value is None:
        hint += " or clip gradients (trainer.clip_grad_norm=1.0)"
    return (
        f"training diverged: non-finite loss or gradient by step {step} "
        f"(train/loss={values['train/loss']:.4g}, grad_norm/total={values['grad_norm/total']:.4g}); "
        f"the step size is likely too large for this problem: {hint}"
    )
