"""How a run makes and synchronises gradients: chosen once, so the training loop never asks what model it has.

A strategy owns what depends on the model's kind and on the number of processes: wrapping the model
(DDP, ``torch.compile``), the forward and backward of one optimizer step's micro-batches with gradient
accumulation (the gradient all-reduce once a step, after the last micro-batch), mixed precision, and
prediction for evaluation. The loop calls :meth:`Strategy.forward_backward` and steps the optimizer.

- :class:`AutogradStrategy`: torch.autograd's gradients; under torchrun DDP all-reduces them during
  backward (``no_sync`` on the accumulating micro-batches); on one process nothing is synchronised.
- :class:`FsdpStrategy` (``trainer.strategy=fsdp``): torch.autograd's gradients on a model sharded by
  FSDP2 (``fully_shard``): each rank holds 1/world of every parameter, gradient and optimizer state; a
  unit's weights are all-gathered for its forward and backward, its gradients reduce-scattered.
- :class:`EngineStrategy`: dtrain's own engine (``model=graph``) computes loss and gradients itself;
  DDP cannot see those, so they are averaged after backward in one bucketed all-reduce.

:func:`build_strategy` is where the choice is made, from ``trainer.strategy`` and
:func:`dtrain.models.gradient_source`: the one place the package asks which kind of model it holds.
Whatever it picks, the loop, the monitor and the checkpoints see the same few methods: a parameter's
``local`` part (a shard or the whole) and :meth:`Strategy.sum_shards` to total what shards hold,
:meth:`Strategy.full_state` for the weights as one file, and the optimizer's state by parameter name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.config import FsdpConfig, TrainerConfig
from dtrain.dist import DistEnv, all_reduce_mean_, all_reduce_sum, current_op
from dtrain.errors import UserError
from dtrain.models import gradient_source
from dtrain.train.objective import LossFn

log = logging.getLogger("dtrain")

MicroBatches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and data: float64 for ``float64``; float32 otherwise (bf16 autocasts on top)."""
    return torch.float64 if precision == "float64" else torch.float32


class Strategy:
    """What every strategy offers the loop; ``model`` is the unwrapped module whose parameters train."""

    sharded = False  # whether a rank holds only a shard of each parameter (then checkpoints are sharded too)

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        self.model = model
        self.env = env
        self.loss = loss
        self.bf16 = trainer.precision == "bf16-mixed"

    def sum_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the shards of the model (in place): what a statistic of parameters or
        gradients computed on this rank's part needs to become the whole model's. Nothing to add up where
        every rank holds whole parameters; a collective (every rank calls it) where they are sharded."""
        return tensor

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The model's whole weights on the host, on rank 0 (None on the others): what ``model.pt`` keeps.
        A collective where the model is sharded: call it on every rank."""
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

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

    sync_op = "gradient all-reduce"  # what a failed collective during backward was doing

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        super().__init__(model, env, trainer, loss)
        self.ddp: DistributedDataParallel | None = None
        wrapped = self.wrap(model, trainer) if env.distributed else model
        self.forward_model = torch.compile(wrapped) if trainer.compile else wrapped

    def wrap(self, model: nn.Module, trainer: TrainerConfig) -> nn.Module:
        """The model as the ranks train it together: DDP's replica, its gradients all-reduced in backward."""
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        return self.ddp

    def forward_backward(self, micro_batches: MicroBatches, step: int, loss_scale: float = 1.0) -> torch.Tensor:
        if self.env.distributed:
            current_op(self.sync_op, step)
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


class FsdpStrategy(AutogradStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over
    the ranks; ``trainer.fsdp`` says which submodules are units of their own (docs/cluster.md).

    Gradients are reduce-scattered after every micro-batch's backward, so an accumulating step never holds
    whole gradients (DDP holds them back until the last one). On one process there is nothing to shard:
    the model trains as it is, and only the checkpoints' format (sharded, any world size) differs from DDP.
    """

    sharded = True
    sync_op = "gradient reduce-scatter"

    def __init__(self, model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> None:
        check_shardable(model, trainer.fsdp)
        self.mixed = trainer.precision == "bf16-mixed" and env.distributed  # FSDP's policy casts, not autocast
        super().__init__(model, env, trainer, loss)
        if self.mixed:
            self.bf16 = False

    def wrap(self, model: nn.Module, trainer: TrainerConfig) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        cfg = trainer.fsdp
        policy = MixedPrecisionPolicy()
        if self.mixed:  # bf16 weights for compute; the output (so the loss) and the gradients in float32, as autocast
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
            )
        options = {
            "mesh": fsdp_mesh(self.env),
            "reshard_after_forward": cfg.reshard_after_forward,
            "mp_policy": policy,
            "offload_policy": CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
            if cfg.cpu_offload
            else OffloadPolicy(),
        }
        for unit in shard_units(model, cfg):
            fully_shard(unit, **options)
        fully_shard(model, **options)  # the root: whatever parameters no unit took
        if self.env.backend == "gloo":
            # gloo has been seen to sum where FSDP asked it to average (PyTorch issue 162338): every unit sums,
            # then divides. (Each unit keeps its own setting; the method exists from torch 2.7.)
            for unit in model.modules():
                if hasattr(unit, "set_force_sum_reduction_for_comms"):
                    unit.set_force_sum_reduction_for_comms(True)
        return model

    def sum_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and self.env.cpu_group is not None:  # offloaded shards beside NCCL: gloo
            torch.distributed.all_reduce(tensor, group=self.env.cpu_group)
            return tensor
        return all_reduce_sum(tensor, self.env)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        if not self.env.distributed:
            return super().full_state()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        current_op("gathering the sharded weights")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # whole tensors on rank 0, {} on the others
        return state if self.env.is_main else None

    def sharded_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's state by parameter name, each tensor this rank's shard (a DTensor):
        what torch.distributed.checkpoint saves and reshards. A fresh optimizer's state is made (zeros) first,
        so these also serve as the shapes to load a checkpoint into."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.model, optimizer)

    def load_sharded_state(
        self, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optimizer_state: dict[str, Any]
    ) -> None:
        """Put :meth:`sharded_state`'s dicts, filled from a checkpoint, back into the model and the optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def fsdp_mesh(env: DistEnv) -> Any:
    """The ranks as FSDP's one-dimensional mesh, on the device they train on.

    Made explicitly: FSDP's default mesh takes the machine's accelerator, so a gloo run on the CPUs of a
    machine that has CUDA would put its shards on a GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.world_size,))


def shard_units(model: nn.Module, cfg: FsdpConfig) -> list[nn.Module]:
    """The submodules ``trainer.fsdp.wrap`` makes units of their own, innermost first (``fully_shard``'s order).

    ``blocks``: each top-level child that holds parameters, looking inside module lists and dicts (which
    have no forward of their own). A list of class names: every submodule of those classes.
    """
    if cfg.wrap == "blocks":
        units: list[nn.Module] = []
        pending = list(model.children())
        while pending:
            child = pending.pop(0)
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                pending[:0] = list(child.children())
            elif any(p.requires_grad for p in child.parameters()):
                units.append(child)
        return units
    names = set(cfg.wrap)
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not units:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(
            f"trainer.fsdp.wrap={list(cfg.wrap)} names no module of this model; its classes are: {', '.join(present)}"
        )
    return units[::-1]  # modules() lists parents first: shard the innermost units before what holds them


def check_shardable(model: nn.Module, cfg: FsdpConfig) -> None:
    """Refuse, in one line, a model that ``fully_shard`` cannot shard: parameters of zero dimensions (the
    polynomials' scalar coefficients), or a wrapping rule that names none of its modules."""
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise UserError(
            f"trainer.strategy=fsdp cannot shard this model: fully_shard splits parameters along their first "
            f"dimension and {scalars[0]} is a 0-dimensional scalar; use trainer.strategy=ddp"
        )
    shard_units(model, cfg)


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


# (where the gradients come from, trainer.strategy) -> the strategy; a pair not here is refused.
STRATEGIES: dict[tuple[str, str], type[Strategy]] = {
    ("autograd", "ddp"): AutogradStrategy,
    ("autograd", "fsdp"): FsdpStrategy,
    ("engine", "ddp"): EngineStrategy,
}


def strategy_class(model: nn.Module, trainer: TrainerConfig) -> type[Strategy]:
    """The strategy that trains ``model`` as ``trainer.strategy`` asks; a one-line refusal where none can."""
    source = gradient_source(model)
    chosen = STRATEGIES.get((source, trainer.strategy))
    if chosen is None:
        raise UserError(
            f"trainer.strategy={trainer.strategy} cannot train model=graph: dtrain's engine computes its own "
            f"gradients, which FSDP cannot shard; use trainer.strategy=ddp"
        )
    return chosen


def build_device(trainer: TrainerConfig, env: DistEnv) -> torch.device:
    """Where the model is built and checked before its strategy takes it: the training device, except a model
    to be sharded over several ranks, which stays in host memory until ``fully_shard`` moves each unit's shard
    to the device (so a model bigger than one device never has to fit on one)."""
    return torch.device("cpu") if trainer.strategy == "fsdp" and env.distributed else env.device


def check_strategy(model: nn.Module, trainer: TrainerConfig) -> None:
    """Before anything is written: refuse a strategy that cannot train ``model`` (one line, exit 2)."""
    if strategy_class(model, trainer) is FsdpStrategy:
        check_shardable(model, trainer.fsdp)


def build_strategy(model: nn.Module, env: DistEnv, trainer: TrainerConfig, loss: LossFn) -> Strategy:
    """The strategy for ``model`` on ``env``; the model must already be on the device in its dtype.

    Build the optimizer after it, from ``strategy.model``'s parameters: sharding replaces them.
    """
    return strategy_class(model, trainer)(model, env, trainer, loss)
