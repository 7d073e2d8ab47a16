"""A user's data from disk: ``.npz`` (arrays ``x`` and ``y``) or ``.csv`` (a header and a target column)."""

from __future__ import annotations

import csv
import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from dtrain import config as C
from dtrain.data.dataset import DataSet, split_train_val
from dtrain.errors import UserError
from dtrain.launch_env import rank

log = logging.getLogger("dtrain")
# A target of at most this many distinct integers, in a run that did not say data.task, looks like classes.
FEW_VALUES = 20
# More classes than this with fewer rows than this per class on average: a regression target given as classes
# (the diabetes target as classification: 214 "classes" in 442 rows).
MANY_CLASSES, FEW_ROWS_PER_CLASS = 10, 5


def load(cfg: C.FileDataConfig, gen: torch.Generator) -> DataSet:
    """Read ``cfg.path``, check it, and split it into train/val."""
    x, y = _read(cfg, with_target=True)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"data.path={cfg.path!r}: x must be a non-empty [N, features] array, got {x.shape}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise UserError(f"data.path={cfg.path!r}: x has {x.shape[0]} rows but y has shape {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")

    xt = torch.as_tensor(x, dtype=torch.float64)
    task = cfg.task or "regression"
    if task == "classification":
        if y.ndim > 1 and y.shape[1:] != (1,) * (y.ndim - 1):
            raise UserError(f"data.path={cfg.path!r}: classification needs one label per row, y has shape {y.shape}")
        labels = y.reshape(-1)
        _check_labels(cfg.path, labels)
        yt = torch.as_tensor(labels, dtype=torch.long)
        num_classes = int(yt.max()) + 1
    else:
        yt = torch.as_tensor(y.reshape(y.shape[0], -1), dtype=torch.float64)
        if yt.shape[1] != 1:
            raise UserError(f"data.path={cfg.path!r}: regression needs one target column, got {yt.shape[1]}")
        num_classes = 0
        if cfg.task is None and rank() == 0:
            _warn_if_classes(cfg.path, y.reshape(-1))
    train, val = split_train_val(xt, yt, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task=task, num_classes=num_classes)


def _existing_file(cfg: C.FileDataConfig) -> Path:
    """``data.path`` as a path to a file, or a one-line error saying what it is instead."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        raise UserError(f"data.path={cfg.path!r} is a directory, not a file: give a .npz or .csv file in it")
    if not path.is_file():
        raise UserError(f"data.path={cfg.path!r}: no such file (expected a .npz or .csv file)")
    return path


def _check_labels(where: str, labels: np.ndarray) -> None:
    """Class labels must be the indices 0..K-1, each used, with fewer classes than makes sense for the rows."""
    if not np.all(labels == np.round(labels)):
        raise UserError(
            f"data.path={where!r}: classification targets must be class indices 0..K-1, and some are not whole "
            "numbers (a regression target? then data.task=regression)"
        )
    found = np.unique(labels).astype(np.int64)
    k = len(found)
    rows = len(labels)
    if k > MANY_CLASSES and rows / k < FEW_ROWS_PER_CLASS:
        raise UserError(
            f"data.path={where!r}: data.task=classification but the target has {k} distinct values in {rows} rows: "
            "is it a regression target? (data.task=regression)"
        )
    if found[0] != 0 or found[-1] != k - 1:
        shown = f"{found[0]}..{found[-1]}" if found[-1] - found[0] == k - 1 else ", ".join(map(str, found[:6]))
        fix = f"subtract {found[0]} from every label" if found[-1] - found[0] == k - 1 else "renumber them"
        raise UserError(
            f"data.path={where!r}: labels {shown} ({k} classes); dtrain expects class indices 0..K-1, here "
            f"0..{k - 1}: {fix}"
        )


def _warn_if_classes(where: str, target: np.ndarray) -> None:
    """A target of a few whole numbers, in a run that did not say ``data.task``, is probably class labels."""
    values = np.unique(target)
    if 2 <= len(values) <= FEW_VALUES and np.all(values == np.round(values)) and len(values) < len(target) / 2:
        shown = f"{values[0]:g}..{values[-1]:g}"
        log.warning(
            "data.path=%s: the target holds only the whole numbers %s (%d values) and data.task is not set, so it "
            "trains as regression; if they are classes, set data.task=classification",
            where,
            shown,
            len(values),
        )


def read_features(cfg: C.FileDataConfig) -> np.ndarray:
    """The input rows of ``cfg.path``, for prediction: a ``.npz``'s ``x`` (``y`` may be absent), or every column of a
    ``.csv`` but ``data.target`` (which may be absent)."""
    x, _ = _read(cfg, with_target=False)
    x = x[:, None] if x.ndim == 1 else x
    if not np.isfinite(x).all():
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")
    return x


def _read(cfg: C.FileDataConfig, with_target: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs and the target of ``cfg.path`` as float64 arrays. Without ``with_target`` (prediction) the target
    may be absent: a CSV's target column is left out of the inputs where it is there."""
    path = _existing_file(cfg)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, with_target)
    if suffix != ".csv":
        raise UserError(f"data.path={cfg.path!r}: unsupported suffix {suffix!r}; use .npz or .csv")
    header, values = _read_csv_table(path)
    if cfg.target in header:
        column = header.index(cfg.target)
        return np.delete(values, column, axis=1), values[:, column]
    if with_target:
        raise UserError(f"{path}: no column {cfg.target!r} (data.target); columns: {', '.join(header)}")
    return values, None


def _read_npz(path: Path, with_target: bool) -> tuple[np.ndarray, np.ndarray | None]:
    needed = ("x", "y") if with_target else ("x",)
    try:
        with np.load(path) as arrays:
            missing = [k for k in needed if k not in arrays]
            if missing:
                has = ", ".join(arrays.files) or "none"
                raise UserError(
                    f"{path}: no array {' or '.join(map(repr, missing))}; it has: {has}; "
                    f"a .npz needs {' and '.join(needed)}"
                )
            y = arrays["y"].astype(np.float64) if with_target else None
            return arrays["x"].astype(np.float64), y
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


DELIMITERS = (",", ";", "\t", "|")
INDEX_COLUMN_NAMES = ("", "Unnamed: 0")  # what pandas' to_csv writes above its index (and read_csv reads back)


def _read_csv_table(path: Path) -> tuple[list[str], np.ndarray]:
    """A numeric ``.csv``: its header and its rows, read by pandas' C parser.

    pandas' C parser, because it measured fastest here: 0.52 s for 1M rows x 21 columns, against 2.5 s for
    pyarrow's parser with the conversion to one array and 14.2 s for Python's csv module, on 2 cores
    (benchmarks/csv_loading.py, docs/benchmarks.md). The
    delimiter is the header line's most frequent of ``, ; TAB |``. Where pandas cannot give a table of numbers,
    the file is read again by Python's csv module, whose one-line error names the line and column."""
    delimiter = _sniff_delimiter(path)
    try:
        import pandas as pd

        frame = pd.read_csv(path, sep=delimiter, encoding="utf-8-sig", engine="c")
    except Exception:  # a parser or decoding error: the careful reader says what is wrong, and where
        return _read_csv_slowly(path, delimiter)
    header = [str(name).strip() for name in frame.columns]
    _check_header(path, header)
    numeric = all(pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind) for kind in frame.dtypes)
    if len(frame) == 0 or not numeric:
        return _read_csv_slowly(path, delimiter)
    return header, frame.to_numpy(dtype=np.float64, copy=False)


def _sniff_delimiter(path: Path) -> str:
    with path.open("rb") as handle:
        first = handle.readline().decode("utf-8-sig", errors="replace")
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _check_header(path: Path, header: list[str]) -> None:
    if header and header[0] in INDEX_COLUMN_NAMES:
        raise UserError(
            f"{path}: the first column has no name ({header[0]!r}): a pandas index written by to_csv? Write the "
            "file with to_csv(index=False), or name the column"
        )


def _read_csv_slowly(path: Path, delimiter: str) -> tuple[list[str], np.ndarray]:
    """Python's csv module, cell by cell: slow, but its errors name the line and the column."""
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]  # blank lines carry no data
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a .csv must be UTF-8 text") from None
    if len(rows) < 2:
        raise UserError(f"{path}: a .csv needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    _check_header(path, header)
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(
                f"{path}:{i}: {len(row)} fields, but the header has {len(header)} (delimiter {delimiter!r})"
            )
        for j, cell in enumerate(row):
            try:
                values[i - 2, j] = float(cell)
            except ValueError:
                raise UserError(f"{path}:{i}: column {header[j]!r}: {cell.strip()!r} is not a number") from None
    return header, values
