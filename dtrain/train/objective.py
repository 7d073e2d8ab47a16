"""What a run optimises: the loss (built-in by name, or a user's ``_target_``), checked on one batch before
training, and the per-batch sums that make validation means exact across ranks."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import Config, LossConfig, UserLossConfig
from dtrain.data.dataset import DataSet
from dtrain.errors import ConfigError, first_line
from dtrain.models import gradient_source
from dtrain.models.sizes import ModelSizes

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

REGRESSION_LOSSES = ("mse", "l1", "huber")
CLASSIFICATION_LOSSES = ("cross_entropy", "bce_with_logits")


@dataclass(frozen=True)
class Loss:
    """The loss a run trains with: ``fn(output, target)`` is the batch mean, the step's scalar.

    ``elementwise`` (built-in losses) gives the unreduced loss, from which exact sums over rows and each
    population member's mean follow; a user's loss is only known as a mean, so its sum is mean x rows.
    """

    name: str  # mse | l1 | huber | cross_entropy | bce_with_logits | the user's _target_
    fn: LossFn
    binary: bool = False  # one logit per row (bce_with_logits): class 1 where it is above 0
    elementwise: LossFn | None = None

    def total(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss summed over rows (the batch mean times its rows), so shards of any size add up exactly; zero
        for no rows (a rank whose share of a small validation split is empty)."""
        if target.shape[0] == 0:
            return output.new_zeros(())
        if self.elementwise is None:
            return self.fn(output, target) * target.shape[0]
        per_element = self.elementwise(output, target)
        return per_element.sum() / per_element.shape[1:].numel()

    def members(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each population member's mean loss from outputs ``[M, N, ...]`` against one set of targets: ``[M]``."""
        if self.elementwise is None:
            return torch.vmap(self.fn, in_dims=(0, None))(output, target)
        m, n = output.shape[:2]
        if target.is_floating_point() and tuple(target.shape) == tuple(output.shape[1:]):  # regression: a view
            return self.elementwise(output, target.expand_as(output)).reshape(m, -1).mean(dim=1)
        flat = self.elementwise(output.reshape(m * n, *output.shape[2:]), target.repeat(m, *([1] * (target.ndim - 1))))
        return flat.reshape(m, -1).mean(dim=1)

    def class_logits(self, output: torch.Tensor) -> torch.Tensor:
        """Classification: one logit per class, ``[N, classes]`` (a binary logit ``z`` becomes ``[0, z]``), for
        what draws a decision boundary from logits."""
        if self.binary:
            return torch.cat([torch.zeros_like(output[:, :1]), output.reshape(len(output), 1)], dim=1)
        return output

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """Classification: each class's probability, ``[N, classes]``, from the model's logits."""
        if self.binary:
            p1 = torch.sigmoid(output.reshape(-1))
            return torch.stack([1 - p1, p1], dim=1)
        return torch.softmax(output, dim=1)


def _bce(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output.reshape(-1), target.to(output.dtype), reduction=reduction)


def build_loss(cfg: LossConfig | UserLossConfig, task: str, num_classes: int = 0) -> Loss:
    """The loss ``cfg`` names for ``task``; ``auto`` is mse for regression, cross_entropy for classification.

    Raises :class:`ConfigError` for a built-in loss of the other task, or binary BCE on more than two classes.
    """
    if isinstance(cfg, UserLossConfig):
        return Loss(cfg.target, _user_loss(cfg), binary=False)
    name = cfg.name
    if name == "auto":
        name = "cross_entropy" if task == "classification" else "mse"
    if task == "classification" and name in REGRESSION_LOSSES:
        raise ConfigError(
            f"loss={name} is for regression, but the data is classification; use "
            f"{' or '.join(CLASSIFICATION_LOSSES)} (or data.task=regression)"
        )
    if task == "regression" and name in CLASSIFICATION_LOSSES:
        raise ConfigError(
            f"loss={name} is for classification, but the data is regression; use {', '.join(REGRESSION_LOSSES)}"
        )
    if name == "bce_with_logits":
        if num_classes > 2:
            raise ConfigError(
                f"loss=bce_with_logits needs binary targets (0 or 1), but the data has {num_classes} classes; "
                "use loss=cross_entropy"
            )
        return Loss(name, _bce, binary=True, elementwise=lambda o, t: _bce(o, t, reduction="none"))
    if name == "cross_entropy":
        smoothing = cfg.label_smoothing
        if smoothing == 0:  # the hot path calls F.cross_entropy itself, not a wrapper
            return Loss(name, F.cross_entropy, elementwise=lambda o, t: F.cross_entropy(o, t, reduction="none"))

        def smoothed(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return F.cross_entropy(output, target, label_smoothing=smoothing, reduction=reduction)

        return Loss(name, smoothed, elementwise=lambda o, t: smoothed(o, t, reduction="none"))
    if name == "huber":
        delta = cfg.delta

        def huber(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return F.huber_loss(output, target, delta=delta, reduction=reduction)

        return Loss(name, huber, elementwise=lambda o, t: huber(o, t, reduction="none"))
    fn = F.mse_loss if name == "mse" else F.l1_loss
    return Loss(name, fn, elementwise=lambda o, t: fn(o, t, reduction="none"))


def _user_loss(cfg: UserLossConfig) -> LossFn:
    """A user's loss: a class (``torch.nn.SmoothL1Loss``) built with the arguments, or a function called with
    them bound after ``(prediction, target)``."""
    from dtrain.user_code import call_with, import_target, instantiate_args

    key = "loss._target_"
    target = import_target(cfg.target, key)
    args = instantiate_args(cfg.args, key)
    if inspect.isclass(target):
        built = call_with(target, args, key, cfg.target)
        if not callable(built):
            raise ConfigError(f"{key}={cfg.target!r} built a {type(built).__name__}, which cannot be called")
        return built
    if not callable(target):
        raise ConfigError(f"{key}={cfg.target!r} is a {type(target).__name__}, not a callable (prediction, target)")
    if not args:
        return target

    def bound(output: torch.Tensor, target_: torch.Tensor) -> torch.Tensor:
        return target(output, target_, **args)

    return bound


def check_fit(model: nn.Module, loss: Loss, data: DataSet, sizes: ModelSizes, rows: int = 8) -> None:
    """Run the model and the loss on the first ``rows`` training rows before any training, and refuse (one line)
    a model or loss that fails there, an output whose shape does not fit the targets, and a loss that is not a
    finite scalar with a gradient.

    Evaluation mode and a forked random state: the check changes nothing the run then does.
    """
    x, y = data.train.head(rows)
    weight = next(model.parameters(), None)
    if weight is not None:  # a model to be sharded is checked in host memory (strategy.build_device)
        x, y = x.to(weight.device), y.to(weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            output = _first_call(lambda: model(x), f"the model failed on a first batch of shape {list(x.shape)}")
            if not isinstance(output, torch.Tensor):
                raise ConfigError(
                    f"the model returned a {type(output).__name__}; it must return one tensor of predictions "
                    "(docs/your-model.md)"
                )
            expected = _expected_shape(loss, y, sizes)
            if tuple(output.shape) != expected:
                raise ConfigError(
                    f"the model's output has shape {list(output.shape)} but the targets need {list(expected)} "
                    f"({_what_targets_need(loss, sizes)}): make its last layer give that many outputs"
                )
            value = _first_call(lambda: loss.fn(output, y), f"loss={loss.name} failed on the first batch")
    finally:
        model.train(was_training)
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"loss={loss.name} returned {shape}, not a scalar tensor: reduce it to one number (a mean)")
    first = float(value.detach())
    if not math.isfinite(first):
        raise ConfigError(
            f"loss={loss.name} is {first} on the first batch, before any training: check the loss and the targets"
        )
    if gradient_source(model) == "autograd" and not value.requires_grad:
        raise ConfigError(
            f"loss={loss.name} returned a tensor without a gradient (computed outside autograd, e.g. through .item() "
            "or torch.tensor(...)): compute it with torch operations on the prediction"
        )


def _first_call(call: Callable[[], object], what: str) -> object:
    """``call()``; an exception from the user's code (a model or loss that does not fit the data) as one line."""
    try:
        return call()
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = first_line(exc)
        raise ConfigError(f"{what}: {type(exc).__name__}: {first}") from None


def _expected_shape(loss: Loss, y: torch.Tensor, sizes: ModelSizes) -> tuple[int, ...]:
    if sizes.task == "regression":
        return tuple(y.shape)
    return (y.shape[0], 1) if loss.binary else (y.shape[0], sizes.num_outputs)


def _what_targets_need(loss: Loss, sizes: ModelSizes) -> str:
    if sizes.task == "regression":
        return f"regression: {sizes.num_outputs} value(s) per row"
    if loss.binary:
        return "binary classification with loss=bce_with_logits: one logit per row"
    return f"classification: one logit per class, {sizes.num_outputs} classes"


def val_tag(name: str, suffix: str) -> str:
    """A validation metric's tag: ``val/loss`` for the ordinary split, ``val/loss_outer`` for a named one."""
    return f"val/{name}_{suffix}" if suffix else f"val/{name}"


def metric_sums(loss: Loss, output: torch.Tensor, target: torch.Tensor, accuracy: bool) -> dict[str, torch.Tensor]:
    """Per-batch *sums* (so shards of any size add up exactly): the loss and, with ``accuracy``, the correct rows
    (classification). Single runs add the torchmetrics of :mod:`dtrain.train.metrics`."""
    sums = {"loss": loss.total(output, target)}
    if accuracy:
        predicted = (output.reshape(-1) > 0).long() if loss.binary else output.argmax(dim=1)
        sums["accuracy"] = (predicted == target).sum().to(sums["loss"].dtype)
    return sums


def check_objective(config: Config, data: DataSet, metric_tags: list[str]) -> None:
    """Refuse, before any training, an ``objective.metric`` this run will not produce (a typo would otherwise
    score every trial and member as the worst, silently). ``metric_tags``: the run's validation metrics beside
    the loss."""
    metric = config.objective.metric
    watched = config.checkpoint.save_best or config.trainer.early_stopping.patience > 0
    if watched and not data.val:
        raise ConfigError(
            "checkpoint.save_best and trainer.early_stopping watch validation metrics, but this run has no "
            "validation split (data.val_fraction=0)"
        )
    if metric == "auto":
        return
    produced = ["train/loss", "lr", "grad_norm/total"]
    produced += [val_tag(name, suffix) for suffix in data.val for name in ["loss", *metric_tags]]
    if metric not in produced:
        raise ConfigError(f"objective.metric={metric!r} is not a metric of this run; it has: {', '.join(produced)}")
