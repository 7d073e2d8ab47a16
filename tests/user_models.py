"""A user's own models, losses and metrics, defined outside the dtrain package as a user would define them.

tests/test_user_models.py trains them through the real command line by ``model._target_=tests.user_models.X``.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Inputs -> width -> tanh -> outputs: the sizes come from dtrain (``num_inputs``/``num_outputs``)."""

    def __init__(self, num_inputs: int, num_outputs: int, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(num_inputs, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


def make_tiny(num_inputs: int, num_outputs: int, width: int = 16) -> nn.Module:
    """A factory function rather than a class: dtrain calls it the same way."""
    return TinyNet(num_inputs, num_outputs, width)


class BatchNormNet(nn.Module):
    """Has buffers (BatchNorm's running statistics): trains as a run, but cannot be stacked in a population."""

    def __init__(self, num_inputs: int, num_outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(num_inputs, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FrozenNet(nn.Module):
    """No trainable parameter: refused."""

    def __init__(self, num_inputs: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_outputs).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class OneTooMany(nn.Module):
    """Returns one output more than the targets need: refused before training, naming both shapes."""

    def __init__(self, num_inputs: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_outputs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class NotAModule:
    """A class that is not an nn.Module: refused."""

    def __init__(self, num_inputs: int = 1) -> None:
        self.num_inputs = num_inputs


def scaled_mse(prediction: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A user's loss function, with an argument given beside its ``_target_``."""
    return scale * torch.mean((prediction - target) ** 2)


def per_row_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forgets to reduce: refused before training."""
    return ((prediction - target) ** 2).sum(dim=1)


def nan_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Not finite on the first batch: refused before training."""
    return torch.mean(prediction - target) * float("nan")


def detached_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Computed outside autograd: nothing to train by. Refused before training."""
    return torch.tensor(((prediction - target) ** 2).mean().item())
