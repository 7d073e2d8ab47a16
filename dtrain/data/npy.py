"""Data bigger than memory: ``.npy`` arrays memory-mapped, so that a rank reads only the rows it trains on.

``data.path`` is a directory holding ``x.npy`` and ``<data.target>.npy`` (``y.npy`` by default), or the path of
``x.npy`` itself with the target's file beside it. Nothing is read at start-up but the targets (one value a row,
for the task's checks); the inputs are read a batch of rows at a time by the DataLoader's workers, which share
the mapping, so the page cache and not the process holds the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.errors import UserError


def npy_paths(path: Path, target: str) -> tuple[Path, Path] | None:
    """``(x.npy, <target>.npy)`` where ``path`` is a directory of them or ``x.npy`` itself; None otherwise."""
    directory = path if path.is_dir() else path.parent
    if path.is_dir() or path.suffix.lower() == ".npy":
        x = path / "x.npy" if path.is_dir() else path
        return x, directory / f"{target}.npy"
    return None


def open_array(path: Path) -> np.ndarray:
    """``path`` memory-mapped read-only, or a one-line error."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npy file ({exc})") from None


class MemmapRows:
    """Rows of memory-mapped inputs and targets, as a map-style data set of ``(input, target)`` pairs.

    :meth:`read_rows` reads a whole batch in one fancy-indexed read: one copy of the batch's rows, no more (sorting
    the rows first would read the disk forwards, but cost a second copy to put them back in the batch's order).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.x[row])), torch.from_numpy(np.array(self.y[row]))

    def read_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of ``rows`` (row numbers), collated: [len(rows), ...] each."""
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(self.x[rows]), torch.from_numpy(self.y[rows])

    def __reduce__(self) -> tuple[Any, ...]:
        # A worker started by spawn (not fork) maps the file again rather than receiving a copy of the rows.
        return (_reopen, (self.x.filename, self.y))


def _reopen(x_path: str, y: np.ndarray) -> MemmapRows:
    return MemmapRows(np.load(x_path, mmap_mode="r"), y)
