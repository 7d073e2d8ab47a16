"""A user's data from disk: ``.npz`` (arrays ``x`` and ``y``) or ``.csv`` (a header and a target column)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch

from dtrain import config as C
from dtrain.data.dataset import DataSet, split_train_val
from dtrain.errors import UserError


def load(cfg: C.FileDataConfig, gen: torch.Generator) -> DataSet:
    """Read ``cfg.path``, check it, and split it into train/val."""
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={cfg.path!r}: no such file (expected a .npz or .csv file)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix == ".csv":
        x, y = _read_csv(path, cfg.target)
    else:
        raise UserError(f"data.path={cfg.path!r}: unsupported suffix {suffix!r}; use .npz or .csv")

    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"data.path={cfg.path!r}: x must be a non-empty [N, features] array, got {x.shape}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise UserError(f"data.path={cfg.path!r}: x has {x.shape[0]} rows but y has shape {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")

    xt = torch.as_tensor(x, dtype=torch.float64)
    if cfg.task == "classification":
        if y.ndim > 1 and y.shape[1:] != (1,) * (y.ndim - 1):
            raise UserError(f"data.path={cfg.path!r}: classification needs one label per row, y has shape {y.shape}")
        labels = y.reshape(-1)
        if not np.all(labels == np.round(labels)) or labels.min() < 0:
            raise UserError(f"data.path={cfg.path!r}: classification targets must be class indices 0..K-1")
        yt = torch.as_tensor(labels, dtype=torch.long)
        num_classes = int(yt.max()) + 1
        if num_classes > len(yt):
            raise UserError(
                f"data.path={cfg.path!r}: class label {num_classes - 1} in {len(yt)} rows; "
                "labels must be class indices 0..K-1"
            )
    else:
        yt = torch.as_tensor(y.reshape(y.shape[0], -1), dtype=torch.float64)
        if yt.shape[1] != 1:
            raise UserError(f"data.path={cfg.path!r}: regression needs one target column, got {yt.shape[1]}")
        num_classes = 0
    train, val = split_train_val(xt, yt, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task=cfg.task, num_classes=num_classes)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays]
            if missing:
                raise UserError(f"{path}: missing array(s) {missing}; a .npz needs arrays 'x' and 'y'")
            return arrays["x"].astype(np.float64), arrays["y"].astype(np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


def read_features(cfg: C.FileDataConfig) -> np.ndarray:
    """The input rows of ``cfg.path``, for prediction: a ``.npz``'s ``x`` (``y`` may be absent), or every column of a
    ``.csv`` but ``data.target`` (which may be absent)."""
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={cfg.path!r}: no such file (expected a .npz or .csv file)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path) as arrays:
                if "x" not in arrays:
                    raise UserError(f"{path}: no array 'x'; it has: {', '.join(arrays.files)}")
                x = arrays["x"].astype(np.float64)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    elif suffix == ".csv":
        header, values = _read_csv_table(path)
        x = np.delete(values, header.index(cfg.target), axis=1) if cfg.target in header else values
    else:
        raise UserError(f"data.path={cfg.path!r}: unsupported suffix {suffix!r}; use .npz or .csv")
    x = x[:, None] if x.ndim == 1 else x
    if not np.isfinite(x).all():
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")
    return x


def _read_csv(path: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    header, values = _read_csv_table(path)
    if target not in header:
        raise UserError(f"{path}: no column {target!r} (data.target); columns: {', '.join(header)}")
    col = header.index(target)
    return np.delete(values, col, axis=1), values[:, col]


def _read_csv_table(path: Path) -> tuple[list[str], np.ndarray]:
    """A numeric ``.csv``: its header and its rows."""
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]  # blank lines carry no data
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a .csv must be UTF-8 text") from None
    if len(rows) < 2:
        raise UserError(f"{path}: a .csv needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(f"{path}:{i}: {len(row)} fields, but the header has {len(header)}")
        try:
            values[i - 2] = [float(v) for v in row]
        except ValueError:
            raise UserError(f"{path}:{i}: a non-numeric value in {row}") from None
    return header, values
