"""A multi-layer perceptron with optional LayerNorm, dropout and activation checkpointing."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class Block(nn.Module):
    """Linear -> [LayerNorm] -> activation -> [Dropout].

    Absent layers are None rather than ``nn.Identity``: on small models each module call is a
    measurable share of the step (docs/benchmarks.md).
    """

    def __init__(self, fan_in: int, fan_out: int, activation: str, layer_norm: bool, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out)
        self.norm = nn.LayerNorm(fan_out) if layer_norm else None
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.norm is not None:
            x = self.norm(x)
        x = self.act(x)
        return x if self.drop is None else self.drop(x)


class MLP(nn.Module):
    """Hidden blocks then a linear head: one output for regression, one logit per class otherwise."""

    def __init__(
        self,
        num_inputs: int,
        hidden: list[int],
        num_outputs: int,
        activation: str = "relu",
        layer_norm: bool = False,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        sizes = [num_inputs, *hidden]
        self.blocks = nn.ModuleList(Block(a, b, activation, layer_norm, dropout) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(sizes[-1], num_outputs)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward instead of keeping its activations.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)
