"""Optimizers and learning-rate schedules built from config.

Every schedule is a multiplier of the base learning rate, ``factor(t)``, where ``t`` counts
optimizer steps or epochs (``schedule.interval``), wrapped in a ``LambdaLR``. A linear warmup of
``schedule.warmup`` intervals can precede any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from dtrain.config import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer that ``cfg.name`` names, with the fields it understands."""
    params = list(params)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(cfg: ScheduleConfig, base_lr: float, total: int) -> Callable[[int], float]:
    """The multiplier of ``base_lr`` after ``t`` intervals; ``total`` is the run's length in intervals."""
    warmup = cfg.warmup
    span = max(1, total - warmup)  # length of the schedule after warmup

    def decayed(t: int) -> float:
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "exp_decay":  # the original example: lr = max(min_lr, lr0 * decay^t)
            return max(cfg.min_lr / base_lr, cfg.decay**t)
        if cfg.name == "step":
            return cfg.gamma ** (t // cfg.step_size)
        if cfg.name == "cosine":
            floor = cfg.min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
        raise ValueError(f"unknown schedule {cfg.name!r}")

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        return decayed(t - warmup)

    return factor


def schedule_moves(cfg: ScheduleConfig) -> bool:
    """Whether the rate ever changes: a constant rate without warmup never needs its scheduler stepped."""
    return cfg.name != "constant" or cfg.warmup > 0


def schedule_length(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> int:
    """The run's length in the schedule's intervals: steps, or (started) epochs."""
    return math.ceil(total_steps / steps_per_epoch) if cfg.interval == "epoch" else total_steps


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``total`` intervals; the trainer steps it per step or per epoch as configured."""
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, base_lr, total))
