"""One line that says what was loaded: the source, the rows (and each rank's share), the features, the task and
the targets. Rank 0 prints it at start-up and writes it to TensorBoard's text, so a wrong file, a forgotten
``data.task`` or a split that leaves a rank without rows shows before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dtrain.data.dataset import DataSet
from dtrain.data.loader import shard_bounds


def source_of(cfg: object) -> str:
    """Where the data came from: a file's resolved path, or the generated set's name."""
    path, target = getattr(cfg, "path", None), getattr(cfg, "target", None)
    if getattr(cfg, "name", None) == "custom":
        return f"{target} (data._target_)"
    if path:
        return str(Path(path).expanduser().resolve())
    return f"{getattr(cfg, 'name', '?')} (generated)"


def data_summary(data: DataSet, source: str, world_size: int, global_batch: int, standardizer: Any = None) -> str:
    """``data: SOURCE: N train / M val rows (each rank: ...), F features, TASK, TARGETS[, standardized: ...]``; the
    targets as the user gave them (before standardisation)."""
    line = _summary(data, source, world_size, global_batch, standardizer)
    return line if standardizer is None else f"{line}; {standardizer.describe()}"


def _summary(data: DataSet, source: str, world_size: int, global_batch: int, standardizer: Any) -> str:
    train, val = len(data.train), sum(len(split) for split in data.val.values())
    rows = f"{train} train / {val} val rows"
    if world_size > 1:
        shares = [b - a for a, b in (shard_bounds(val, r, world_size) for r in range(world_size))]
        low, high = min(shares), max(shares)
        val_share = f"{low}" if low == high else f"{low}-{high}"
        rows += f" (each rank: {global_batch // world_size} of every {global_batch}-row batch, {val_share} val rows)"
    shape = "x".join(map(str, data.input_shape))
    features = f"{shape} features" if len(data.input_shape) == 1 else f"inputs of shape {shape}"
    if not data.in_memory:  # its targets are not scanned: that would read the whole data set before training
        classes = f", {data.num_classes} classes" if data.task == "classification" else ""
        return f"data: {source}: {rows}, {features}, {data.task}{classes}, read through a DataLoader"
    y = data.train.y
    if standardizer is not None and data.task == "regression":
        y = standardizer.untargets(y.double())  # in the user's units
    if data.task == "classification":
        counts = torch.bincount(y.reshape(-1).cpu(), minlength=data.num_classes).tolist()
        targets = f"{data.num_classes} classes (train rows a class: {min(counts)}-{max(counts)})"
    else:
        targets = f"target in [{float(y.min()):.4g}, {float(y.max()):.4g}], mean {float(y.double().mean()):.4g}"
    return f"data: {source}: {rows}, {features}, {data.task}, {targets}"
