"""Gradient norms (total and per parameter, in one pass) and clipping by value and by global norm.

Each works on what this rank holds of a parameter: the whole tensor under DDP, a shard of it under FSDP
(:func:`local`). Norms of shards are made whole by summing their squares over the ranks (``sum_shards``,
one collective for every parameter at once); where ranks hold whole tensors that sum is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

SumShards = Callable[[torch.Tensor], torch.Tensor]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a sharded tensor's (DTensor's) shard, or ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def whole_norms(tensors: list[torch.Tensor], sum_shards: SumShards | None = None) -> torch.Tensor:
    """The L2 norm of each tensor in ``tensors`` as one float64 device tensor; with ``sum_shards``, the norms of
    the whole tensors that these are shards of (their squares summed over the ranks: a collective)."""
    norms = torch.stack([n.to(torch.float64) for n in torch._foreach_norm([local(t) for t in tensors])])
    if sum_shards is None:
        return norms
    return sum_shards(norms.square()).sqrt()


def grad_norms(
    named_params: list[tuple[str, nn.Parameter]], sum_shards: SumShards | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Per-parameter L2 norms of the gradients as one device tensor, and the names in the same order.

    One fused ``_foreach_norm`` call and no host sync: the caller moves the tensor to the host once,
    at a logging step. The total norm is the norm of this vector.
    """
    pairs = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not pairs:
        return torch.zeros(0), []
    return whole_norms([g for _, g in pairs], sum_shards), [name for name, _ in pairs]


def clip_gradients(
    params: list[nn.Parameter], max_value: float | None, max_norm: float | None, sum_shards: SumShards | None = None
) -> torch.Tensor | None:
    """Clip each element to +/- ``max_value``, then the global norm to ``max_norm``.

    Returns the total norm *before* norm clipping (a device tensor) when ``max_norm`` is set, else None.
    Both run on the device without a host sync. Call after the gradients are all-reduced (or
    reduce-scattered), so every rank clips the same global gradient the same way.
    """
    if sum_shards is None:  # whole gradients on every rank: torch's own clipping
        if max_value is not None:
            nn.utils.clip_grad_value_(params, max_value, foreach=True)
        if max_norm is not None:
            return nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return None
    grads = [local(p.grad) for p in params if p.grad is not None]
    if max_value is not None and grads:
        torch._foreach_clamp_min_(grads, -max_value)
        torch._foreach_clamp_max_(grads, max_value)
    if max_norm is None:
        return None
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    total = whole_norms(grads, sum_shards).square().sum().sqrt()  # the global norm, over every shard
    # As torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
    return total


def max_abs(grads: list[torch.Tensor]) -> torch.Tensor:
    """The largest absolute element over ``grads`` (this rank's parts; 0 where it holds none), as a device scalar."""
    parts = [t for t in (local(g) for g in grads) if t.numel()]  # a shard can be empty: a 1-row head on 2 ranks
    if not parts:
        return torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
    return torch.stack(torch._foreach_norm(parts, math.inf)).max()
