"""Batched optimizers for a population: M members of one model stepped at once, each with its own hyperparameters.

Every parameter is stored stacked, ``[M, *shape]``, and every hyperparameter and the learning rate are ``[M]``
tensors, viewed as ``[M, 1, ..., 1]`` against each parameter. The updates are torch.optim's single-tensor paths
(SGD, Adam, AdamW) written with the same kernels in the same order, so in float64 each member follows torch.optim
bit for bit (SGD) or to an ulp (Adam: torch.optim computes the bias corrections' powers on the host in Python floats,
here they are device tensors, whose ``pow`` kernel may round differently).

Nothing reads a tensor's value on the host: ``step`` and the clipping helpers queue kernels only, on any device.
Members that are not active keep their parameters and optimizer state bit-for-bit, because the new values are
taken with ``torch.where`` member by member; a member whose gradients hold NaN or inf can therefore be frozen
without its NaNs reaching anyone, and the price is one extra read and write of each tensor a step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """``values`` ([M]) viewed as ``[M, 1, ..., 1]``, so that it broadcasts against the stacked tensor ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


class BatchedOptimizer:
    """The shared part of a batched optimizer: checks, per-member step counts, freezing, the state dict.

    A subclass names its hyperparameters with their torch.optim defaults (``defaults``) and its per-parameter
    state (``state_names``), turns the ``[M]`` hyperparameters into this step's ``[M]`` coefficients
    (``_coefficients``) and writes the update of one stacked parameter (``_update``), returning new tensors
    rather than writing in place: the base class decides member by member which values are kept.

    ``hparams`` holds the optimizer's own copies; writing into them (say, a population-based search copying a
    member's hyperparameters) takes effect at the next step. Their values are not checked: that would need a
    host sync, and the caller that samples them is the place to validate them.
    """

    defaults: ClassVar[dict[str, float]] = {}
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: list[Tensor], hparams: dict[str, Tensor] | None = None) -> None:
        """Optimize the stacked ``params`` in place; ``hparams`` maps names in ``defaults`` to ``[M]`` tensors."""
        self.params = list(params)
        if not self.params:
            raise ValueError("a batched optimizer needs at least one parameter")
        first = self.params[0]
        if first.dim() == 0:
            raise ValueError("parameters must be stacked with a leading member axis; got a 0-d tensor")
        self.members = first.shape[0]
        for k, param in enumerate(self.params):
            if param.dim() == 0 or param.shape[0] != self.members:
                raise ValueError(f"parameter {k} has shape {tuple(param.shape)}; expected [{self.members}, ...]")
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown hyperparameters {unknown} for {type(self).__name__}; valid: {sorted(self.defaults)}"
            )
        self.hparams: dict[str, Tensor] = {}
        for name, default in self.defaults.items():
            value = hparams.get(name)
            if value is None:
                # Made in the parameters' dtype directly: 1e-8 rounded through float32 is not float64's 1e-8.
                value = torch.full((self.members,), default, dtype=first.dtype, device=first.device)
            elif tuple(value.shape) != (self.members,):
                raise ValueError(f"hyperparameter {name!r} has shape {tuple(value.shape)}; expected [{self.members}]")
            self.hparams[name] = value.detach().to(device=first.device, dtype=first.dtype).clone()
        # Counted in floats like torch.optim's `step` (float32 at least, so that counts stay exact to 2**24).
        step_dtype = torch.promote_types(first.dtype, torch.float32)
        self.steps = torch.zeros(self.members, dtype=step_dtype, device=first.device)
        self.state: dict[str, list[Tensor]] = {
            name: [torch.zeros_like(param) for param in self.params] for name in self.state_names
        }

    def step(self, grads: list[Tensor], lr: Tensor, active: Tensor) -> None:
        """One update of the active members with their learning rates ``lr`` ([M]); ``active`` is [M] bool.

        Inactive members keep their parameters, state and step count exactly, whatever their gradients hold.
        No host synchronisation: every check here reads shapes only.
        """
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        for k, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            if grad.shape != param.shape:
                raise ValueError(f"gradient {k} has shape {tuple(grad.shape)}; its parameter {tuple(param.shape)}")
        for name, value in (("lr", lr), ("active", active)):
            if tuple(value.shape) != (self.members,):
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected [{self.members}]")
        with torch.no_grad():
            steps = torch.where(active, self.steps + 1, self.steps)
            coefficients = self._coefficients(lr, steps)
            for k, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
                member = {name: _per_member(value, param) for name, value in coefficients.items()}
                state = {name: self.state[name][k] for name in self.state_names}
                new_param, new_state = self._update(param, grad, state, member)
                take = _per_member(active, param)
                param.copy_(torch.where(take, new_param, param))
                for name in self.state_names:
                    state[name].copy_(torch.where(take, new_state[name], state[name]))
            self.steps.copy_(steps)

    def _coefficients(self, lr: Tensor, steps: Tensor) -> dict[str, Tensor]:
        """This step's per-member ([M]) coefficients from ``lr`` and the step counts after this step."""
        raise NotImplementedError

    def _update(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], c: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The new value of one stacked parameter and its state; ``c`` holds the coefficients as [M, 1, ...]."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """The step counts, hyperparameters and state as a flat dict of tensors (references, as in torch.optim)."""
        result = {"steps": self.steps}
        result.update({f"hparams.{name}": value for name, value in self.hparams.items()})
        for name in self.state_names:
            result.update({f"{name}.{k}": tensor for k, tensor in enumerate(self.state[name])})
        return result

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy a ``state_dict()`` of an optimizer of the same kind and shapes into this one."""
        own = self.state_dict()
        if set(state_dict) != set(own):
            missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            raise ValueError(f"state dict does not fit {type(self).__name__}: missing {missing}, unexpected {extra}")
        for name, tensor in own.items():
            if state_dict[name].shape != tensor.shape:
                raise ValueError(
                    f"state {name!r} has shape {tuple(state_dict[name].shape)}; expected {tuple(tensor.shape)}"
                )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])


class BatchedSGD(BatchedOptimizer):
    """torch.optim.SGD per member: ``momentum`` and coupled ``weight_decay`` per member, no dampening.

    ``nesterov`` is shared. A member with zero momentum takes plain SGD steps even under ``nesterov`` (which
    torch.optim refuses): its buffer then always holds the current gradient.
    """

    defaults: ClassVar[dict[str, float]] = {"momentum": 0.0, "weight_decay": 0.0}
    state_names: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def __init__(self, params: list[Tensor], hparams: dict[str, Tensor] | None = None, nesterov: bool = False) -> None:
        """See ``BatchedOptimizer``; ``nesterov`` applies to every member."""
        super().__init__(params, hparams)
        self.nesterov = nesterov

    def _coefficients(self, lr: Tensor, steps: Tensor) -> dict[str, Tensor]:
        return {"neg_lr": -lr, "momentum": self.hparams["momentum"], "weight_decay": self.hparams["weight_decay"]}

    def _update(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], c: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # addcmul(a, b, w) is the same fused multiply-add as torch.optim's a.add(b, alpha=w), to the last bit.
        grad = torch.addcmul(grad, param, c["weight_decay"])
        # torch.optim's first buffer is a copy of the gradient; from a zero buffer, 0 * momentum + grad is exactly
        # that (without dampening), so the first step needs no case of its own. Not addcmul: torch.optim rounds
        # buf * momentum before adding.
        buf = state["momentum_buffer"] * c["momentum"] + grad
        direction = torch.addcmul(grad, buf, c["momentum"]) if self.nesterov else buf
        return torch.addcmul(param, direction, c["neg_lr"]), {"momentum_buffer": buf}


class BatchedAdam(BatchedOptimizer):
    """torch.optim.Adam per member (``beta1``, ``beta2``, ``eps``, ``weight_decay``), without amsgrad.

    With ``decoupled_weight_decay`` the decay is AdamW's, ``param * (1 - lr * weight_decay)`` before the step.
    """

    defaults: ClassVar[dict[str, float]] = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    state_names: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, params: list[Tensor], hparams: dict[str, Tensor] | None = None, decoupled_weight_decay: bool = False
    ) -> None:
        """See ``BatchedOptimizer``; ``decoupled_weight_decay`` applies to every member."""
        super().__init__(params, hparams)
        self.decoupled_weight_decay = decoupled_weight_decay

    def _coefficients(self, lr: Tensor, steps: Tensor) -> dict[str, Tensor]:
        beta1, beta2 = self.hparams["beta1"], self.hparams["beta2"]
        weight_decay = self.hparams["weight_decay"]
        # A member that has not stepped yet gets 1 - beta**0 = 0 here, so inf/NaN coefficients; the base class
        # discards its update, and all arithmetic is per member, so nothing reaches the others.
        bias_correction1 = 1 - beta1**steps
        bias_correction2 = 1 - beta2**steps
        return {
            "decay": 1 - lr * weight_decay,
            "weight_decay": weight_decay,
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "neg_step_size": -(lr / bias_correction1),
            "bias_correction2_sqrt": bias_correction2.sqrt(),
            "eps": self.hparams["eps"],
        }

    def _update(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], c: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.decoupled_weight_decay:
            param = param * c["decay"]
        else:
            grad = torch.addcmul(grad, param, c["weight_decay"])
        exp_avg = torch.lerp(state["exp_avg"], grad, c["one_minus_beta1"])
        # torch.optim's mul_(beta2).addcmul_(grad, grad, value=1 - beta2) multiplies value * grad first.
        exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * c["beta2"], c["one_minus_beta2"] * grad, grad)
        denom = exp_avg_sq.sqrt() / c["bias_correction2_sqrt"] + c["eps"]
        # addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom: the same order here.
        new_param = torch.addcdiv(param, c["neg_step_size"] * exp_avg, denom)
        return new_param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class BatchedAdamW(BatchedAdam):
    """torch.optim.AdamW per member: Adam with decoupled weight decay, 0.01 by default as in torch.optim."""

    defaults: ClassVar[dict[str, float]] = {**BatchedAdam.defaults, "weight_decay": 1e-2}

    def __init__(self, params: list[Tensor], hparams: dict[str, Tensor] | None = None) -> None:
        """See ``BatchedOptimizer``."""
        super().__init__(params, hparams, decoupled_weight_decay=True)


_OPTIMIZERS: dict[str, type[BatchedOptimizer]] = {"sgd": BatchedSGD, "adam": BatchedAdam, "adamw": BatchedAdamW}


def build_batched_optimizer(
    name: str, params: list[Tensor], hparams: dict[str, Tensor] | None = None, nesterov: bool = False
) -> BatchedOptimizer:
    """The batched optimizer called ``name`` (sgd, adam or adamw) over the stacked ``params``."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown batched optimizer {name!r}; valid names: {', '.join(_OPTIMIZERS)}")
    if name == "sgd":
        return BatchedSGD(params, hparams, nesterov=nesterov)
    if nesterov:
        raise ValueError(f"nesterov applies to sgd only, not to {name!r}")
    return _OPTIMIZERS[name](params, hparams)


def member_grad_norms(grads: list[Tensor]) -> Tensor:
    """Each member's L2 norm over all its gradients, ``[M]``: per-tensor norms first, then their norm, as torch."""
    per_tensor = [torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1) for grad in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor, dim=1), dim=1)


@torch.no_grad()
def clip_grad_norm_(grads: list[Tensor], max_norm: Tensor) -> Tensor:
    """Scale each member's gradients in place as ``torch.nn.utils.clip_grad_norm_`` would; returns the norms before.

    ``max_norm`` is [M]; a member whose limit is +inf is left untouched, even when its norm is inf or NaN.
    """
    norms = member_grad_norms(grads)
    # torch computes max_norm / (norm + 1e-6) as Tensor.__rtruediv__, i.e. reciprocal() * max_norm: same bits.
    coefficient = torch.clamp((norms + 1e-6).reciprocal() * max_norm, max=1.0)
    # Without this, inf / inf would turn the gradients of a member that has no limit into NaN.
    coefficient = torch.where(torch.isposinf(max_norm), 1.0, coefficient)
    for grad in grads:
        grad.mul_(_per_member(coefficient, grad))
    return norms


@torch.no_grad()
def clip_grad_value_(grads: list[Tensor], clip: Tensor) -> None:
    """Clamp each member's gradients in place to ``[-clip, clip]`` with its own ``clip`` ([M])."""
    for grad in grads:
        bound = _per_member(clip, grad)
        grad.clamp_(min=-bound, max=bound)
