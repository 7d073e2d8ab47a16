"""Standardisation that travels with the model: statistics of the training split, applied to every split for
training, saved in ``model.pt``, and applied again (and undone on a regression's predictions) wherever the
trained model is used: ``dtrain.load``, ``dtrain predict``, ``dtrain report``.

The statistics are sums over each rank's shard of the training rows, reduced across ranks in one all-reduce,
so every rank holds the same numbers and a data set read from disk is read once, a shard per rank. They are
sums of differences from the first training row (the same row on every rank), which keeps the variance exact
for features far from zero. A feature that never varies keeps a scale of 1: it becomes zero, not NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtrain.data.dataset import AnySplit, DataSet, DatasetSplit, Split
from dtrain.data.loader import shard_bounds

# Rows read at a time while the statistics are summed: bounded memory for data read from disk.
CHUNK_ROWS = 65_536
# A spread this small beside the feature's own size is no spread: the feature is constant.
CONSTANT = 1e-12


def scale_inputs(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` as x * (1/std) - mean/std: one pass and one new tensor (a table's copy, not two), and
    the same bits in training (:class:`Standardizer`) and in prediction (:class:`Standardized`)."""
    scale = 1 / std
    return torch.addcmul(-mean * scale, x, scale)


def unscale_targets(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardised targets (or predictions of them) back in the data's units."""
    return y * std + mean


@dataclass
class Standardizer:
    """Per-value mean and standard deviation of the inputs, and of a regression's targets (None: left as is)."""

    x_mean: torch.Tensor  # the shape of one row's input
    x_std: torch.Tensor
    y_mean: torch.Tensor | None = None  # [targets]
    y_std: torch.Tensor | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return scale_inputs(x, self.x_mean.to(x), self.x_std.to(x))

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else (y - self.y_mean.to(y)) / self.y_std.to(y)

    def untargets(self, y: torch.Tensor) -> torch.Tensor:
        """Predictions in the user's units again."""
        return y if self.y_mean is None else unscale_targets(y, self.y_mean.to(y), self.y_std.to(y))

    def state(self) -> dict[str, Any]:
        """As ``model.pt`` keeps it: tensors (float64, CPU) and None."""
        return {"standardize": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Standardizer | None:
        if not state or "standardize" not in state:
            return None
        return cls(**state["standardize"])

    def describe(self) -> str:
        """For the start-up summary: what was standardised, and the target's scale."""
        what = "standardized: inputs"
        if self.y_mean is not None and self.y_mean.numel() == 1:
            mean, std = float(self.y_mean), float(self.y_std)
            what += f" and target (mean {mean:.4g}, std {std:.4g}; the loss is in standard units)"
        return what

    def apply(self, data: DataSet) -> DataSet:
        """``data`` with every split standardised: tensors transformed once, a Dataset's batches as they are read."""
        return dataclasses.replace(
            data, train=self._split(data.train), val={name: self._split(s) for name, s in data.val.items()}
        )

    def _split(self, split: AnySplit) -> AnySplit:
        if isinstance(split, DatasetSplit):
            return split.with_transform(self)
        y = self.targets(split.y) if split.y.is_floating_point() else split.y
        return Split(self.inputs(split.x), y, split.indices)


def fit_standardizer(
    split: AnySplit, targets: bool, rank: int = 0, world_size: int = 1, reduce: Any = None
) -> Standardizer:
    """Statistics of ``split`` (the training split, float64): this rank's shard summed, ``reduce`` (an all-reduce
    sum, when there are several ranks) adding the others'. ``targets``: also the targets (regression)."""
    shift_x, shift_y = (t[0].to(torch.float64) for t in split.head(1))
    start, stop = shard_bounds(len(split), rank, world_size)
    sums = [torch.zeros(1, dtype=torch.float64)]
    sums += [torch.zeros_like(shift_x) for _ in range(2)] + [torch.zeros_like(shift_y) for _ in range(2)]
    for lo in range(start, stop, CHUNK_ROWS):
        x, y = (t.to(torch.float64) for t in split.rows(lo, min(lo + CHUNK_ROWS, stop)))
        dx, dy = x - shift_x, y - shift_y
        for i, value in enumerate((dx.sum(0), (dx * dx).sum(0), dy.sum(0), (dy * dy).sum(0)), start=1):
            sums[i] += value
        sums[0] += len(x)
    flat = torch.cat([s.reshape(-1) for s in sums])
    if reduce is not None:
        flat = reduce(flat)
    sums = list(torch.split(flat, [s.numel() for s in sums]))
    count = float(sums[0])
    x_mean, x_std = _moments(shift_x, sums[1].reshape(shift_x.shape), sums[2].reshape(shift_x.shape), count)
    if not targets:
        return Standardizer(x_mean, x_std)
    y_mean, y_std = _moments(shift_y, sums[3].reshape(shift_y.shape), sums[4].reshape(shift_y.shape), count)
    return Standardizer(x_mean, x_std, y_mean, y_std)


def _moments(shift: torch.Tensor, total: torch.Tensor, squares: torch.Tensor, count: float) -> tuple[torch.Tensor, ...]:
    mean_diff = total / count
    std = (squares / count - mean_diff * mean_diff).clamp_min(0).sqrt()
    mean = shift + mean_diff
    constant = std <= CONSTANT * mean.abs().clamp_min(1.0)
    return mean, torch.where(constant, torch.ones_like(std), std)


class Standardized(nn.Module):
    """A trained model with its preprocessing: inputs in the user's units, predictions in the user's units."""

    def __init__(self, model: nn.Module, standardizer: Standardizer) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("x_mean", standardizer.x_mean.clone())
        self.register_buffer("x_std", standardizer.x_std.clone())
        self.scales_targets = standardizer.y_mean is not None
        if self.scales_targets:
            self.register_buffer("y_mean", standardizer.y_mean.clone())
            self.register_buffer("y_std", standardizer.y_std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(scale_inputs(x, self.x_mean, self.x_std))
        return unscale_targets(output, self.y_mean, self.y_std) if self.scales_targets else output
