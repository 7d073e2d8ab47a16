"""Gradient norms (total and per parameter, in one pass) and clipping by value and by global norm."""

from __future__ import annotations

import torch
from torch import nn


def grad_norms(named_params: list[tuple[str, nn.Parameter]]) -> tuple[torch.Tensor, list[str]]:
    """Per-parameter L2 norms of the gradients as one device tensor, and the names in the same order.

    One fused ``_foreach_norm`` call and no host sync: the caller moves the tensor to the host once,
    at a logging step. The total norm is the norm of this vector.
    """
    pairs = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not pairs:
        return torch.zeros(0), []
    norms = torch._foreach_norm([g for _, g in pairs])
    return torch.stack([n.to(torch.float64) for n in norms]), [name for name, _ in pairs]


def clip_gradients(params: list[nn.Parameter], max_value: float | None, max_norm: float | None) -> torch.Tensor | None:
    """Clip each element to +/- ``max_value``, then the global norm to ``max_norm``.

    Returns the total norm *before* norm clipping (a device tensor) when ``max_norm`` is set, else None.
    Both run on the device without a host sync. Call after the gradients are all-reduced, so every
    rank clips the same global gradient the same way.
    """
    if max_value is not None:
        nn.utils.clip_grad_value_(params, max_value, foreach=True)
    if max_norm is not None:
        return nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return None
