"""How a run makes and synchronises gradients: chosen once, so the training loop never asks what model it has.

A strategy owns what depends on the model's kind and on the number of processes: wrapping the model
(DDP, ``torch.compile``), the forward and backward of one optimizer step's micro-batches with gradient
accumulation (the gradient all-reduce once a step, after the last micro-batch), mixed precision, and
prediction for evaluation. The loop calls :meth:`Strategy.forward_backward` and steps the optimizer.

- :class:`AutogradStrategy`: torch.autograd's gradients; under torchrun DDP all-reduces them during
  backward (``no_sync`` on the accumulating micro-batches); on one process nothing is synchronised.
- :class:`EngineStrategy`: dtrain's own engine (``model=graph``) computes loss and gradients itself;
  DDP cannot see those, so they are averaged after backward in one bucketed all-reduce.

:func:`build_strategy` is where the choice is made, from :func:`dtrain.models.gradient_source`: the one
place the package asks which kind of model it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.config import TrainerConfig
from dtrain.dist import DistEnv, all_reduce_mean_, current_op
from dtrain.models import gradient_source
from dtrain.train.objective import LossFn

MicroBatches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and data: float64 for ``float64``; float32 otherwise (bf16 autocasts on top)."""
    return torch.float64 if precision == "float64" else torch.float32


class Strategy:
    """What every strategy offers the loop; ``model`` is the unwrapped module whose parameters train."""

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        self.model = model
        self.env = env
        self.loss = loss
        self.bf16 = trainer.precision == "bf16-mixed"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for ``bf16-mixed``; nothing otherwise."""
        if self.bf16:
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: MicroBatches, step: int, loss_scale: float = 1.0) -> torch.Tensor:
        """Accumulate one optimizer step's gradients over ``micro_batches`` (synchronised across ranks when
        this returns) and return the step's loss, the mean over micro-batches, detached, on the device.

        ``loss_scale`` multiplies the loss and its gradients (fault injection poisons a step with NaN).
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for ``x`` under this strategy's precision, in float32 or float64."""
        with self.autocast():
            output = self.model(x)
        return output.float() if output.dtype == torch.bfloat16 else output

    def run_files(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
        """Extra files for the run directory that this kind of model offers (name -> text), from a batch."""
        return {}


class AutogradStrategy(Strategy):
    """torch.autograd's gradients; DDP all-reduces them under torchrun."""

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        super().__init__(model, env, trainer, loss)
        self.ddp: DistributedDataParallel | None = None
        wrapped: nn.Module = model
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            wrapped = self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.forward_model = torch.compile(wrapped) if trainer.compile else wrapped

    def forward_backward(self, micro_batches: MicroBatches, step: int, loss_scale: float = 1.0) -> torch.Tensor:
        if self.ddp is not None:
            current_op("gradient all-reduce", step)
        count = len(micro_batches)
        if count == 1 and loss_scale == 1.0:  # the common step: nothing to scale, nothing to hold back
            x, y = micro_batches[0]
            with self.autocast():
                loss = self.loss(self.forward_model(x), y)
            loss.backward()
            return loss.detach()
        total: torch.Tensor | None = None
        for i, (x, y) in enumerate(micro_batches):
            # Gradients of the accumulating micro-batches stay local; the last one's backward all-reduces.
            hold_back = self.ddp is not None and i < count - 1
            with self.ddp.no_sync() if hold_back else contextlib.nullcontext():  # type: ignore[union-attr]
                with self.autocast():
                    loss = self.loss(self.forward_model(x), y) * (loss_scale / count)
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total


class EngineStrategy(Strategy):
    """dtrain's engine computes loss and gradients; one bucketed all-reduce averages them across ranks."""

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        super().__init__(model, env, trainer, loss)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(self, micro_batches: MicroBatches, step: int, loss_scale: float = 1.0) -> torch.Tensor:
        scale = loss_scale / len(micro_batches)
        total: torch.Tensor | None = None
        for x, y in micro_batches:
            loss = self.model.loss_and_backward(x, y, scale)  # type: ignore[operator]
            part = loss * scale if scale != 1.0 else loss
            total = part if total is None else total + part
        if self.env.distributed:
            current_op("gradient all-reduce", step)
            all_reduce_mean_([p.grad for p in self.params], self.env)
        assert total is not None
        return total

    def run_files(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
        """The engine's loss graph in Graphviz DOT (docs/graph.md)."""
        return {"graph.dot": self.model.to_dot(x, y)}  # type: ignore[operator]


STRATEGIES: dict[str, type[Strategy]] = {"autograd": AutogradStrategy, "engine": EngineStrategy}


def build_strategy(model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> Strategy:
    """The strategy for ``model`` on ``env``; the model must already be on the device in its dtype."""
    return STRATEGIES[gradient_source(model)](model, env, trainer, loss)
