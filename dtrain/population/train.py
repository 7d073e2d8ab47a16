"""The population's training loop: every member steps at once, each with its own hyperparameters.

It takes the single run's steps (the same batches, the same schedule arithmetic, gradient norms before
clipping, value clipping before norm clipping), and the single run's :class:`~dtrain.train.cadence.Cadence`
decides when it logs and evaluates (checkpoint steps are logging steps there too), so a member rerun
alone follows the same trajectory and is measured at the same steps. What differs: members
that go non-finite are frozen and marked ``diverged`` while the others continue; there are no
checkpoints (population runs are short; run again to redo one).

Host syncs happen only at logging steps, as in the ordinary loop: finiteness, freezing and the
per-member learning rates all stay on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from dtrain.config import TrainerConfig
from dtrain.data.dataset import DataSet
from dtrain.data.loader import ShardedBatches
from dtrain.optim import lr_factor, schedule_length, schedule_moves
from dtrain.population.members import Member
from dtrain.population.optim import (
    build_batched_optimizer,
    clip_grad_norm_,
    clip_grad_value_,
    member_grad_norms,
)
from dtrain.population.stacked import StackedModel
from dtrain.results import PopulationFit
from dtrain.train.cadence import Cadence
from dtrain.train.objective import metric_sums, val_tag

# (step, {tag: one value per local member}): called at logging steps and evaluations.
Report = Callable[[int, dict[str, list[float]]], None]
# Whether any member, on any rank, still trains, given this rank's answer (a collective under torchrun,
# so it is asked at logging steps only, where every rank asks it).
AnyTraining = Callable[[bool], bool]


class MemberRates:
    """Each member's learning rate at each schedule interval: its ``optim.lr`` times its schedule's factor,
    in the same float arithmetic as ``LambdaLR`` in a single run."""

    def __init__(self, members: list[Member], total_intervals: int, device: torch.device, dtype: torch.dtype) -> None:
        self.base = [m.config.optim.lr for m in members]
        self.factors = [lr_factor(m.config.schedule, m.config.optim.lr, total_intervals) for m in members]
        self.moves = any(schedule_moves(m.config.schedule) for m in members)
        self.device, self.dtype = device, dtype
        self._constant = torch.tensor(self.base, dtype=dtype, device=device)

    def at(self, interval: int) -> torch.Tensor:
        if not self.moves:
            return self._constant
        rates = [lr * factor(interval) for lr, factor in zip(self.base, self.factors, strict=True)]
        return torch.tensor(rates, dtype=self.dtype).to(self.device, non_blocking=True)


def optimizer_hparams(
    name: str, members: list[Member], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The batched optimizer's per-member hyperparameters, from each member's ``optim`` section."""

    def column(read: Callable[[Member], float]) -> torch.Tensor:
        return torch.tensor([float(read(m)) for m in members], dtype=dtype, device=device)

    hparams = {"weight_decay": column(lambda m: m.config.optim.weight_decay)}
    if name == "sgd":
        return hparams | {"momentum": column(lambda m: m.config.optim.momentum)}
    return hparams | {
        "beta1": column(lambda m: m.config.optim.betas[0]),
        "beta2": column(lambda m: m.config.optim.betas[1]),
        "eps": column(lambda m: m.config.optim.eps),
    }


def evaluate_members(model: StackedModel, data: DataSet, chunk_rows: int) -> dict[str, torch.Tensor]:
    """Each member's validation metrics (``val/loss``, ``val/accuracy``, ``val/loss_outer``...): ``[M]`` tensors."""
    model.train(False)
    results: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for suffix, split in data.val.items():
            sums: dict[str, torch.Tensor] = {}
            for lo in range(0, len(split), chunk_rows):
                x, y = split.x[lo : lo + chunk_rows], split.y[lo : lo + chunk_rows]
                outputs = model.predict(x)  # [M, rows, outputs]
                for member, output in enumerate(outputs):
                    for name, value in metric_sums(model.loss, output, y, data.task == "classification").items():
                        sums.setdefault(name, torch.zeros(len(outputs), dtype=torch.float64, device=x.device))
                        sums[name][member] += value.to(torch.float64)
            for name, total in sums.items():
                results[val_tag(name, suffix)] = total / len(split)
    model.train(True)
    return results


def fit_population(
    model: StackedModel,
    members: list[Member],
    data: DataSet,
    batches: ShardedBatches,
    cadence: Cadence,
    trainer: TrainerConfig,
    optim_name: str,
    nesterov: bool,
    report: Report,
    any_training: AnyTraining = lambda local: local,
) -> PopulationFit:
    """Train this rank's ``members`` (stacked in ``model``) together on the full training data.

    ``cadence`` is the single run's: a population saves no checkpoints, but it logs at the steps a single
    run logs (checkpoint steps included), so its members' logged windows are the same, and evaluates
    where a single run evaluates.
    """
    params = model.params
    device, dtype, m = params[0].device, params[0].dtype, len(members)
    total_steps = cadence.total_steps
    schedule = members[0].config.schedule  # members may differ in its values, never in its interval
    per_epoch = schedule.interval == "epoch"
    rates = MemberRates(members, schedule_length(schedule, total_steps, batches.steps_per_epoch), device, dtype)
    optimizer = build_batched_optimizer(
        optim_name, params, optimizer_hparams(optim_name, members, device, dtype), nesterov
    )
    clip_norms = [m.config.trainer.clip_grad_norm for m in members]
    max_norm = torch.tensor([c if c is not None else math.inf for c in clip_norms], dtype=dtype, device=device)
    clip_value = None
    if trainer.clip_grad_value is not None:
        clip_value = torch.full((m,), trainer.clip_grad_value, dtype=dtype, device=device)

    active = torch.ones(m, dtype=torch.bool, device=device)
    frozen_at = torch.zeros(m, dtype=torch.long, device=device)  # 0: never frozen
    loss_sum = torch.zeros(m, dtype=dtype, device=device)
    first_loss = torch.full((m,), math.nan, dtype=dtype, device=device)
    min_loss = torch.full((m,), math.inf, dtype=dtype, device=device)
    last_loss = torch.full((m,), math.nan, dtype=dtype, device=device)
    metrics: list[dict[str, float]] = [{} for _ in members]
    steps_since_log = 0
    began = last_log = time.perf_counter()
    aside = 0.0  # seconds spent evaluating: left out of the throughput, as in a single run
    model.train(True)
    step, epoch, evaluated_at, stopped = 0, 0, -1, False
    while step < total_steps:
        for micro_batches in batches.epoch(epoch):
            step += 1
            scale = 1.0 / len(micro_batches)
            losses = torch.zeros(m, dtype=dtype, device=device)
            grads: list[torch.Tensor] | None = None
            for x, y in micro_batches:
                part_losses, part_grads = model.losses_and_grads(x, y)
                if len(micro_batches) > 1:
                    part_losses = part_losses * scale
                    part_grads = [g * scale for g in part_grads]
                losses += part_losses
                grads = part_grads if grads is None else [a + b for a, b in zip(grads, part_grads, strict=True)]
            assert grads is not None
            # Norms before any clipping (what a single run logs, and what tells a non-finite gradient that
            # value clipping would clamp); then value clipping, then norm clipping, as in a single run.
            if clip_value is None and any(clip_norms):
                norms = clip_grad_norm_(grads, max_norm)  # returns the norms before it clips
            else:
                norms = member_grad_norms(grads)
                if clip_value is not None:
                    clip_grad_value_(grads, clip_value)
                if any(clip_norms):
                    clip_grad_norm_(grads, max_norm)
            finite = torch.isfinite(losses) & torch.isfinite(norms)
            frozen_at = torch.where(active & ~finite, step, frozen_at)
            active &= finite
            interval = epoch if per_epoch else step - 1
            lr = rates.at(interval)
            optimizer.step(grads, lr, active)

            if step == 1:
                first_loss = losses.clone()
            min_loss = torch.where(active, torch.fmin(min_loss, losses), min_loss)
            last_loss = torch.where(active | (frozen_at == step), losses, last_loss)
            loss_sum += losses
            steps_since_log += 1
            if cadence.logs(step):
                now = time.perf_counter()
                values = {
                    "train/loss": (loss_sum / steps_since_log).tolist(),
                    "lr": lr.tolist(),
                    "grad_norm/total": norms.tolist(),
                }
                active_now = active.tolist()
                for member, alive in enumerate(active_now):
                    if alive:
                        metrics[member].update({tag: v[member] for tag, v in values.items()})
                values = {
                    tag: [v if alive else math.nan for v, alive in zip(vs, active_now, strict=True)]
                    for tag, vs in values.items()
                }
                seconds = max(now - last_log - aside, 1e-9)
                # Each member's own throughput; the population's is their sum (over every rank's members).
                values["perf/samples_per_sec"] = [steps_since_log * batches.global_batch / seconds] * m
                report(step, values)
                loss_sum.zero_()
                steps_since_log, last_log, aside = 0, now, 0.0
                if not any_training(any(active_now)):
                    stopped = True  # every member diverged: nothing left to train
                    break
            if cadence.evaluates(step, evaluated_at):
                evaluated_at = step
                started = time.perf_counter()
                val = {tag: v.tolist() for tag, v in evaluate_members(model, data, batches.micro_batch).items()}
                if val:
                    report(step, val)
                for member in range(m):
                    metrics[member].update({tag: v[member] for tag, v in val.items()})
                aside += time.perf_counter() - started
            if step == total_steps:
                break
        epoch += 1
        if stopped:
            break
    wall = time.perf_counter() - began
    frozen = frozen_at.tolist()
    status = ["diverged" if f else "completed" for f in frozen]
    for member, f in enumerate(frozen):
        if f:  # a diverged member's metrics are those of the model that diverged: not a result
            metrics[member] = {tag: math.nan for tag in metrics[member]} | {"train/loss": math.nan}
    return PopulationFit(
        status=status,
        steps=[f or step for f in frozen],
        metrics=metrics,
        first_loss=first_loss.tolist(),
        min_loss=min_loss.tolist(),
        last_loss=last_loss.tolist(),
        total_steps=step,
        wall_time_s=wall,
        member_samples_per_sec=step * batches.global_batch * m / max(wall, 1e-9),
    )
