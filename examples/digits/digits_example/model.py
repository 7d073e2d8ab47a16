"""DigitsCNN: two small convolutions and a linear head for 8x8 grey-level images.

dtrain hands a model rows of features, ``[N, 64]`` here, and fills ``num_inputs`` (64) and ``num_outputs``
(10 classes) from the data; the network turns each row back into a 1x8x8 image itself and returns logits
``[N, num_outputs]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, num_inputs: int, num_outputs: int, channels: int = 16) -> None:
        super().__init__()
        side = math.isqrt(num_inputs)
        if side * side != num_inputs:
            raise ValueError(f"num_inputs={num_inputs} is not a square image (8x8 digits have 64)")
        if channels < 1:
            raise ValueError(f"channels={channels} must be at least 1")
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Linear(2 * channels * (side // 2) ** 2, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, 1, self.side, self.side)
        return self.head(self.features(images).flatten(1))
