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

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import OptimConfig, ScheduleConfig, TrainerConfig
from dtrain.data.dataset import DataSet, Split
from dtrain.data.loader import ShardedBatches, shard_bounds
from dtrain.dist import DistEnv, all_reduce_mean_, all_reduce_sum, current_op
from dtrain.faults import Faults
from dtrain.models.graph import GraphModel
from dtrain.optim import build_optimizer, build_scheduler, schedule_length, schedule_moves
from dtrain.preemption import Preemption
from dtrain.train.logger import RunLogger
from dtrain.train.monitor import StepMonitor, custom_scalars_layout
from dtrain.train.objective import loss_fn, metric_sums, val_tag
from dtrain.train.state import Checkpointer, Progress

log = logging.getLogger("dtrain")
MAX_FIGURES = 10  # model figures per run (plus the final model's)


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and data: float64 for ``float64``; float32 otherwise (bf16 autocasts on top)."""
    return torch.float64 if precision == "float64" else torch.float32


def run_length(steps_per_epoch: int, trainer: TrainerConfig) -> int:
    """Optimizer steps in the run: ``max_epochs`` epochs, or ``max_steps`` if that comes sooner."""
    total = steps_per_epoch * trainer.max_epochs
    return total if trainer.max_steps is None else min(total, trainer.max_steps)


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
            tag = val_tag(name, suffix)
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
    checkpointer: Checkpointer,
    faults: Faults,
    preemption: Preemption,
) -> TrainResult:
    """Train ``model`` on ``data`` (already on the device) in ``batches``; return how it ended.

    ``model`` holds the trained weights afterwards. With ``checkpointer.resumed`` set, training continues
    from that checkpoint's state exactly where it stopped.
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

    steps_per_epoch = batches.steps_per_epoch
    total_steps = run_length(steps_per_epoch, trainer)
    optimizer = build_optimizer(params, optim)
    per_epoch = schedule.interval == "epoch"
    moves = schedule_moves(schedule)  # a constant rate without warmup: its scheduler is never stepped
    scheduler = build_scheduler(optimizer, schedule, schedule_length(schedule, total_steps, steps_per_epoch))
    compute_loss = loss_fn(data.task)

    # The loss accumulates on the device between logging steps: no host sync on ordinary steps. A
    # non-finite loss on any step makes the sum non-finite, so checking it at logging steps suffices.
    # Kept in the weights' dtype (float32 or float64): a dtype conversion every step costs measurably.
    loss_sum = torch.zeros((), dtype=param_dtype(trainer.precision), device=env.device)
    monitor = StepMonitor(
        named_params, trainer.clip_grad_value, trainer.clip_grad_norm, trainer.histogram_every, logger, env.device
    )
    logger.custom_scalars(custom_scalars_layout(monitor, bool(data.val), env.device.type == "cuda"))
    sums = {"loss": loss_sum, "clipped": monitor.clipped}  # accumulated between logging steps
    progress = Progress()
    if checkpointer.resumed is not None:
        progress = checkpointer.restore(model, optimizer, scheduler, optim, sums)
    status, message = "completed", ""
    began = time.perf_counter()
    last_log_time = began
    # Throughput counts training only: time spent evaluating and checkpointing is measured and left out.
    aside_since_log = aside_seconds = 0.0
    prior_train, prior_wall = progress.train_seconds, progress.wall_seconds

    # The model's picture costs 0.1-0.5 s to draw: at evaluations, at most about MAX_FIGURES a run, and the end.
    figure_spacing = max(1, total_steps // MAX_FIGURES)
    figured_at = -figure_spacing

    def run_evaluation() -> None:
        nonlocal aside_since_log, figured_at
        started = time.perf_counter()
        current_op("evaluation metrics all-reduce", progress.step)
        val = evaluate(model, data.val, data.task, env, autocast, chunk=batches.micro_batch)
        logger.scalars(progress.step, val)
        progress.metrics.update(val)
        progress.evaluated_at = progress.step
        due = progress.step - figured_at >= figure_spacing or progress.step == total_steps
        if trainer.figures and env.is_main and due:
            logger.images(progress.step, draw_figures(model, data, env.device, batches.micro_batch))
            figured_at = progress.step
        aside_since_log += time.perf_counter() - started  # evaluate() ends in a host sync: this is its real cost

    def save_checkpoint() -> None:
        nonlocal aside_since_log
        started = time.perf_counter()
        progress.wall_seconds = prior_wall + started - began
        progress.train_seconds = prior_train + started - began - aside_total()
        data_order = {"seed": batches.seed, "epoch": progress.epoch, "step_in_epoch": step_in_epoch()}
        checkpointer.save(model, optimizer, scheduler, progress, sums, data_order)
        aside_since_log += time.perf_counter() - started

    def aside_total() -> float:
        return aside_seconds + aside_since_log

    def step_in_epoch() -> int:
        return progress.step - progress.epoch * steps_per_epoch

    skip_policy = trainer.on_nonfinite == "skip"
    model.train()
    micro_iter = None
    while progress.step < total_steps:
        if micro_iter is None:
            micro_iter = iter(batches.epoch(progress.epoch, start_step=step_in_epoch()))
        micro_batches = next(micro_iter)
        step = progress.step + 1  # the step being taken (1-based): what logs and checkpoints call it
        poison = math.nan if faults.armed and faults.poisons(step) else 1.0
        if env.distributed:
            current_op("gradient all-reduce", step)
        if engine:
            # The engine computes loss and gradients itself; then one bucketed all-reduce.
            scale = 1.0 / len(micro_batches)
            step_loss = torch.zeros_like(loss_sum) if skip_policy else loss_sum
            for x, y in micro_batches:
                loss = model.loss_and_backward(x, y, scale * poison)
                step_loss += loss * (scale * poison) if scale * poison != 1.0 else loss
            all_reduce_mean_([p.grad for p in params], env)
        else:
            step_loss = torch.zeros_like(loss_sum) if skip_policy else loss_sum
            for i, (x, y) in enumerate(micro_batches):
                last_micro = i == len(micro_batches) - 1
                # Gradients of the accumulating micro-batches stay local; the last one all-reduces.
                sync = contextlib.nullcontext() if last_micro or not env.distributed else ddp_model.no_sync()
                with sync:
                    with autocast():
                        loss = compute_loss(forward_model(x), y)
                        if len(micro_batches) > 1 or poison != 1.0:
                            loss = loss * (poison / len(micro_batches))
                    loss.backward()
                step_loss += loss.detach()
        progress.step = step
        progress.steps_since_log += 1
        checkpoint_due = checkpointer.due(step, total_steps)
        # Checkpoint steps are logging steps: their divergence check keeps a non-finite state out of a checkpoint.
        log_now = step % trainer.log_every == 0 or step == total_steps or checkpoint_due

        skipped = False
        if skip_policy:
            # The ranks agree on finiteness before the optimizer step (one collective and one host sync
            # a step, the price of this policy), so all of them skip the same steps.
            skipped = not all_finite(step_loss, params, env, step)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                progress.skipped_in_a_row += 1
                progress.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient on some rank: step skipped", step)
                if progress.skipped_in_a_row > trainer.max_skipped_steps:
                    status = "diverged"
                    message = (
                        f"training diverged: {progress.skipped_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient, more than trainer.max_skipped_steps={trainer.max_skipped_steps} "
                        f"(the last at step {step}); {divergence_hint(optim, trainer)}"
                    )
                    break
            else:
                progress.skipped_in_a_row = 0
        if not skipped:
            if skip_policy:
                loss_sum += step_loss
            progress.losses_since_log += 1
            # Norms before clipping (at logging steps), then clipping. A non-finite gradient under norm
            # clipping turns the parameters, and so the next loss, non-finite.
            if log_now or not monitor.idle:
                monitor.clip(step, log_now)
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used, which is what we log
        if not skipped:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if moves and not per_epoch:
                scheduler.step()

        if log_now:
            # One collective and one host sync for everything reduced across ranks. Gradient
            # norms need no reduction: after the all-reduce every rank holds the same gradients.
            current_op("metrics all-reduce", step)
            reduced = all_reduce_sum(torch.stack([loss_sum]), env)
            stats, tags = monitor.device_values() if not skipped else (reduced.new_zeros(0), [])
            host = torch.cat([reduced.double(), stats.to(reduced.device)]).tolist()
            now = time.perf_counter()
            train_seconds = now - last_log_time - aside_since_log
            values = {
                "train/loss": host[0] / (max(progress.losses_since_log, 1) * env.world_size),
                "lr": step_lr,
                "perf/samples_per_sec": progress.steps_since_log * batches.global_batch / max(train_seconds, 1e-9),
                "perf/step_time_ms": 1e3 * train_seconds / progress.steps_since_log,
            }
            stat = dict(zip(tags, host[1:], strict=True))
            norms = [v for k, v in stat.items() if k.startswith("grad_norm/")]
            if norms:
                values["grad_norm/total"] = math.sqrt(sum(v * v for v in norms))
            if "clipped_steps" in stat:
                values["train/clipped_fraction"] = stat.pop("clipped_steps") / max(progress.losses_since_log, 1)
            values.update(stat)
            if env.device.type == "cuda":
                values["perf/gpu_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 1e9
            if progress.skipped_steps:
                values["train/skipped_steps"] = float(progress.skipped_steps)
            logger.scalars(step, values)
            logger.progress_update(step, total_steps, progress.epoch + 1, values)
            progress.metrics.update(values)
            if not all(math.isfinite(values[k]) for k in ("train/loss", "grad_norm/total") if k in values):
                status = "diverged"
                message = divergence_message(step - progress.steps_since_log, step, values, optim, trainer)
                break
            loss_sum.zero_()
            monitor.reset()
            progress.steps_since_log = progress.losses_since_log = 0
            last_log_time = now
            aside_seconds += aside_since_log
            aside_since_log = 0.0

        if trainer.eval_every and step % trainer.eval_every == 0:
            run_evaluation()
        if step == (progress.epoch + 1) * steps_per_epoch:
            # A whole epoch ran: per-epoch schedules and end-of-epoch evaluation, but no more often
            # than every log_every steps (with one step an epoch, evaluating each epoch would sync each step).
            if moves and per_epoch:
                scheduler.step()
            if not trainer.eval_every and step - max(progress.evaluated_at, 0) >= trainer.log_every:
                run_evaluation()
            progress.epoch += 1
            micro_iter = None

        # A step boundary: everything of this step is done, so a checkpoint here resumes exactly.
        if step == total_steps and progress.evaluated_at != step:
            run_evaluation()  # the final model's metrics belong in the final checkpoint
        if checkpoint_due:
            save_checkpoint()
        if preemption.agreed(step):
            save_checkpoint()
            status = "preempted"
            message = (
                f"stopped by {preemption.signal_name} after step {step}: checkpoint saved in "
                f"{checkpointer.directory}; launch the same command (same run directory) to resume"
            )
            break
        if faults.armed:
            faults.after_step(step, lambda: preemption.received is not None)

    if status == "completed" and progress.evaluated_at != progress.step:
        run_evaluation()  # resumed from a checkpoint saved before the end's evaluation existed
    preemption.finish()
    now = time.perf_counter()
    wall = prior_wall + now - began
    train_seconds = prior_train + now - began - aside_total()
    return TrainResult(
        status=status,
        steps=progress.step,
        metrics=progress.metrics,
        samples_per_sec=progress.step * batches.global_batch / max(train_seconds, 1e-9),
        wall_time_s=wall,
        message=message,
    )


def draw_figures(model: nn.Module, data: DataSet, device: torch.device, chunk: int) -> dict[str, np.ndarray]:
    """The model's figures (dtrain.train.figures) as RGB images, the model run in eval mode in chunks."""
    from dtrain.train.figures import figure_to_rgb, model_figures

    def predict(x: torch.Tensor) -> torch.Tensor:
        outputs = [model(x[i : i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)]
        return torch.cat(outputs)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {tag: figure_to_rgb(figure) for tag, figure in model_figures(predict, data).items()}
    finally:
        model.train(was_training)


def all_finite(step_loss: torch.Tensor, params: list[nn.Parameter], env: DistEnv, step: int) -> bool:
    """Whether this step's loss on every rank and the (all-reduced) gradients are finite: the same answer
    on every rank, from one collective."""
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.stack([step_loss.detach().double().sum(), *(g.double().sum() for g in grads)]).sum()
    bad = (~torch.isfinite(local)).to(torch.float64).reshape(1)
    current_op("non-finite check all-reduce", step)
    return all_reduce_sum(bad, env).item() == 0


def divergence_hint(optim: OptimConfig, trainer: TrainerConfig) -> str:
    """What to try when a run diverges."""
    hint = f"lower the learning rate (optim.lr={optim.lr:g})"
    if trainer.clip_grad_norm is None and trainer.clip_grad_value is None:
        hint += " or clip gradients (trainer.clip_grad_norm=1.0)"
    return hint


def divergence_message(
    after: int, step: int, values: dict[str, float], optim: OptimConfig, trainer: TrainerConfig
) -> str:
    """One line that says the run diverged, where, and what to try."""
    where = f"at step {step}" if after + 1 == step else f"between steps {after + 1} and {step}"
    grad = values.get("grad_norm/total", math.nan)
    return (
        f"training diverged: non-finite loss or gradient {where} "
        f"(train/loss={values['train/loss']:.4g}, grad_norm/total={grad:.4g}); "
        f"the step size is likely too large for this problem: {divergence_hint(optim, trainer)}"
    )
