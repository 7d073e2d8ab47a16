"""The data set a model trains on: its splits, shapes and task; built by :mod:`dtrain.data.registry`.

A split is either a pair of tensors held whole on the training device (:class:`Split`, the fast path every
built-in data set takes) or a map-style ``torch.utils.data.Dataset`` read a batch at a time
(:class:`DatasetSplit`: a user's own data set, memory-mapped ``.npy`` files). Both answer ``len``, ``head(n)``
and ``rows(lo, hi)``, which is all that the checks, the summary and evaluation read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import TensorDataset, default_collate

from dtrain.errors import ConfigError


@dataclass
class Split:
    """Inputs ``x`` of shape [N, inputs] and targets ``y``: [N, 1] floats, or [N] class indices; ``indices``: which
    rows of the source (a file, the user's tensors) these are, where it has rows of its own."""

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> Split:
        y = self.y.to(device) if self.y.dtype == torch.long else self.y.to(device, dtype)
        return Split(self.x.to(device, dtype), y, self.indices)

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of rows ``lo..hi-1``: views, no copy."""
        return self.x[lo:hi], self.y[lo:hi]

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` rows (fewer if the split is shorter)."""
        return self.rows(0, n)


class DatasetSplit:
    """Rows of a map-style ``Dataset`` whose items are ``(input, target)`` pairs, read on demand.

    ``indices`` picks and orders the dataset's rows (a train/val split of one dataset); batches come back
    collated as a DataLoader would, as ``dtype`` floats (class indices stay ``long``) on ``device``, with a
    regression target of one value a row shaped [N, 1] like :class:`Split`'s.
    """

    def __init__(
        self,
        dataset: Any,
        indices: torch.Tensor | None = None,
        task: str = "regression",
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        transform: Any = None,
    ) -> None:
        self.dataset, self.indices, self.task = dataset, indices, task
        self.device, self.dtype = device or torch.device("cpu"), dtype
        self.transform = transform  # a Standardizer (dtrain.data.standardize), applied as batches are read

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def to(self, device: torch.device, dtype: torch.dtype) -> DatasetSplit:
        return DatasetSplit(self.dataset, self.indices, self.task, device, dtype, self.transform)

    def with_transform(self, transform: Any) -> DatasetSplit:
        return DatasetSplit(self.dataset, self.indices, self.task, self.device, self.dtype, transform)

    def dataset_rows(self, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The dataset's row numbers at ``positions`` of this split."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return positions if self.indices is None else self.indices[positions]

    def fetch(self, positions: Sequence[int] | torch.Tensor) -> Any:
        """The collated, unconverted batch at ``positions``: ``read_rows`` or ``__getitems__`` where the dataset has
        it (one read for the batch), a ``TensorDataset``'s tensors indexed at once, else item by item."""
        rows = self.dataset_rows(positions)
        read_rows = getattr(self.dataset, "read_rows", None)  # already collated (a memory-mapped array's rows)
        if read_rows is not None:
            return read_rows(rows.numpy())
        if isinstance(self.dataset, TensorDataset):  # one gather per tensor, not an item and a stack per row
            return tuple(tensor[rows] for tensor in self.dataset.tensors)
        listed = rows.tolist()  # a user's Dataset is indexed by Python ints
        getitems = getattr(self.dataset, "__getitems__", None)
        return default_collate(getitems(listed) if getitems is not None else [self.dataset[i] for i in listed])

    def convert(self, batch: Any, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated ``(inputs, targets)`` batch as the model and the loss take it, on the training device."""
        x, y = batch
        x = torch.as_tensor(x).to(self.device, self.dtype, non_blocking=non_blocking)
        y = torch.as_tensor(y)
        if self.task == "classification":
            y = y.to(self.device, torch.long, non_blocking=non_blocking)
        else:
            y = y.to(self.device, self.dtype, non_blocking=non_blocking)
            y = y[:, None] if y.ndim == 1 else y
        if self.transform is not None:
            x = self.transform.inputs(x)
            y = y if self.task == "classification" else self.transform.targets(y)
        return x, y

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``lo..hi-1`` of this split, read and converted."""
        hi = min(hi, len(self))
        if hi <= lo and len(self) == 0:
            raise ConfigError("a split of the data set is empty; lower data.val_fraction or provide more data")
        if hi <= lo:  # an empty slice (a rank without validation rows): zero rows of the right shapes
            x, y = self.rows(0, 1)
            return x[:0], y[:0]
        return self.convert(self.fetch(range(lo, hi)))

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` rows (fewer if the split is shorter)."""
        return self.rows(0, n)


AnySplit = Split | DatasetSplit


@dataclass
class DataSet:
    """A training split and named validation splits.

    ``val`` maps a suffix to a split: ``""`` is the ordinary validation set (logged as
    ``val/loss``), ``"outer"`` the extrapolation range of ``sine`` (``val/loss_outer``).
    """

    train: AnySplit
    val: dict[str, AnySplit]
    task: str  # regression | classification
    num_classes: int = 0
    extras: dict[str, object] = field(default_factory=dict)  # e.g. the true coefficients
    classes: list[float] | None = None  # the label each class index stands for, where data.labels=remap renumbered
    features: list[str] | None = None  # a table's input columns, in the order the model takes them

    def __post_init__(self) -> None:
        # val_fraction=0 leaves an empty split: no validation then, rather than a mean over nothing.
        self.val = {name: split for name, split in self.val.items() if len(split) > 0}

    def source_rows(self) -> dict[str, torch.Tensor] | None:
        """The source's row numbers of the training and the validation split, where the split was dtrain's:
        ``split.npz`` in the run directory, so validation can be reproduced outside dtrain."""
        splits = {"train": self.train} | ({"val": self.val[""]} if "" in self.val else {})
        rows = {name: split.indices for name, split in splits.items()}
        return rows if all(r is not None for r in rows.values()) else None

    @property
    def in_memory(self) -> bool:
        """Held whole as tensors (the fast path); otherwise read through a DataLoader."""
        return isinstance(self.train, Split)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one row's input: ``(features,)`` for a table, ``(channels, height, width)`` for images."""
        return tuple(self.train.head(1)[0].shape[1:])

    @property
    def num_inputs(self) -> int:
        """Values in one row's input: the features of a table (what a flattening model takes)."""
        return int(torch.Size(self.input_shape).numel())

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
            classes=self.classes,
            features=self.features,
        )


def require_in_memory(data: DataSet, what: str) -> None:
    """Refuse (one line) a data set read through a DataLoader where ``what`` needs every row in memory."""
    if not data.in_memory:
        raise ConfigError(
            f"{what} needs the data in memory as tensors, and this data set is read through a DataLoader (a Dataset "
            "from data._target_, or memory-mapped .npy): return tensors (x, y), give a table or a .npz, or train "
            "one model"
        )


def split_rows(num: int, val_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers of the training and the validation split: shuffled once with ``gen``, ``val_fraction`` held
    out."""
    order = torch.randperm(num, generator=gen)
    num_val = round(val_fraction * num)
    return order[num_val:], order[:num_val]


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, gen: torch.Generator) -> tuple[Split, Split]:
    """Shuffle once with ``gen`` and hold out ``val_fraction`` of the points for validation."""
    train_idx, val_idx = split_rows(x.shape[0], val_fraction, gen)
    return Split(x[train_idx], y[train_idx], train_idx), Split(x[val_idx], y[val_idx], val_idx)


def split_dataset(
    dataset: Any, val_fraction: float, gen: torch.Generator, task: str
) -> tuple[DatasetSplit, DatasetSplit]:
    """One map-style data set split as :func:`split_train_val` splits tensors: the same rows for the same seed."""
    train_idx, val_idx = split_rows(len(dataset), val_fraction, gen)
    return DatasetSplit(dataset, train_idx, task), DatasetSplit(dataset, val_idx, task)
