"""The in-memory data set every model trains on: its splits, shapes and task; built by :mod:`dtrain.data.registry`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """Inputs ``x`` of shape [N, inputs] and targets ``y``: [N, 1] floats, or [N] class indices."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> Split:
        y = self.y.to(device) if self.y.dtype == torch.long else self.y.to(device, dtype)
        return Split(self.x.to(device, dtype), y)


@dataclass
class DataSet:
    """A training split and named validation splits.

    ``val`` maps a suffix to a split: ``""`` is the ordinary validation set (logged as
    ``val/loss``), ``"outer"`` the extrapolation range of ``sine`` (``val/loss_outer``).
    """

    train: Split
    val: dict[str, Split]
    task: str  # regression | classification
    num_classes: int = 0
    extras: dict[str, object] = field(default_factory=dict)  # e.g. the true coefficients

    def __post_init__(self) -> None:
        # val_fraction=0 leaves an empty split: no validation then, rather than a mean over nothing.
        self.val = {name: split for name, split in self.val.items() if len(split) > 0}

    @property
    def num_inputs(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.task == "classification" else 1

    def to(self, device: torch.device, dtype: torch.dtype) -> DataSet:
        return DataSet(
            train=self.train.to(device, dtype),
            val={name: split.to(device, dtype) for name, split in self.val.items()},
            task=self.task,
            num_classes=self.num_classes,
            extras=self.extras,
        )


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, gen: torch.Generator) -> tuple[Split, Split]:
    """Shuffle once with ``gen`` and hold out ``val_fraction`` of the points for validation."""
    order = torch.randperm(x.shape[0], generator=gen)
    num_val = round(val_fraction * x.shape[0])
    val_idx, train_idx = order[:num_val], order[num_val:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])
