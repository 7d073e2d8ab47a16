"""What a task optimises and measures: the loss (of one model, and of a population's members), and the summed
metrics for evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dtrain.config import Config
from dtrain.data.dataset import DataSet
from dtrain.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_fn(task: str) -> LossFn:
    """Mean squared error for regression, softmax cross-entropy for classification (means over the batch)."""
    if task == "classification":
        return F.cross_entropy
    return F.mse_loss


def member_losses_fn(task: str) -> LossFn:
    """:func:`loss_fn` for a population: each member's mean loss from outputs ``[M, N, out]`` against one set
    of targets, ``[M]``."""
    if task == "classification":

        def cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            m, n, classes = output.shape
            per_sample = F.cross_entropy(output.reshape(m * n, classes), y.repeat(m), reduction="none")
            return per_sample.reshape(m, n).mean(dim=1)

        return cross_entropy

    def mse(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (output - y).square().mean(dim=(1, 2))

    return mse


def metric_names(task: str) -> list[str]:
    """The names :func:`metric_sums` gives for ``task``."""
    return ["loss", "accuracy"] if task == "classification" else ["loss"]


def val_tag(name: str, suffix: str) -> str:
    """A validation metric's tag: ``val/loss`` for the ordinary split, ``val/loss_outer`` for a named one."""
    return f"val/{name}_{suffix}" if suffix else f"val/{name}"


def metric_sums(task: str, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch *sums* (so shards of any size add up exactly across ranks): loss and, for classes, correct."""
    if task == "classification":
        sums = {"loss": F.cross_entropy(output, target, reduction="sum")}
        sums["accuracy"] = (output.argmax(dim=1) == target).sum().to(sums["loss"].dtype)
        return sums
    return {"loss": F.mse_loss(output, target, reduction="sum") / target.shape[1:].numel()}


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
