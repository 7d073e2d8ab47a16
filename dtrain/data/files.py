"""A user's data from disk (docs/data.md).

* ``.csv`` / ``.csv.gz`` (a header and a target column) and ``.parquet``: tables read whole, the columns chosen by
  ``data.features`` / ``data.drop`` read alone where the format allows;
* ``.npz`` with arrays ``x`` and ``<data.target>``;
* ``.npy``: ``x.npy`` and ``<data.target>.npy``, or a directory of them, memory-mapped (:mod:`dtrain.data.npy`)
  and read through a DataLoader, so data bigger than memory trains.
"""

from __future__ import annotations

import csv
import gzip
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain import config as C
from dtrain.data.dataset import DataSet, split_dataset, split_train_val
from dtrain.data.labels import check_labels, remap_labels
from dtrain.data.npy import MemmapRows, npy_paths, open_array
from dtrain.errors import UserError, first_line
from dtrain.launch_env import rank

log = logging.getLogger("dtrain")
# A target of at most this many distinct integers, in a run that did not say data.task, looks like classes.
FEW_VALUES = 20


def load(cfg: C.FileDataConfig, gen: torch.Generator) -> DataSet:
    """Read ``cfg.path``, check it, and split it into train/val."""
    path = _existing_path(cfg)
    arrays = npy_paths(path, cfg.target)
    if arrays is not None:
        return _load_memmapped(cfg, *arrays, gen)
    x, y, features = _read(cfg, path, with_target=True)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"data.path={cfg.path!r}: x must be a non-empty [N, features] array, got {x.shape}")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise UserError(f"data.path={cfg.path!r}: x has {x.shape[0]} rows but y has shape {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")

    xt = torch.as_tensor(x, dtype=torch.float64)
    if y.ndim > 1 and y.shape[1:] != (1,) * (y.ndim - 1):
        raise UserError(f"data.path={cfg.path!r}: needs one target a row, y has shape {y.shape}")
    task, num_classes, labels, classes = _task(cfg, y.reshape(-1))
    if task == "classification":
        yt = torch.as_tensor(labels, dtype=torch.long)
    else:
        yt = torch.as_tensor(y.reshape(-1, 1), dtype=torch.float64)
    train, val = split_train_val(xt, yt, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task=task, num_classes=num_classes, classes=classes, features=features)


FORMATS = ".csv, .csv.gz, .parquet, .npz or .npy"


def _existing_path(cfg: C.FileDataConfig) -> Path:
    """``data.path`` as an existing file or directory, or a one-line error."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path={cfg.path!r}: no such file (expected a {FORMATS} file)")
    return path


def _load_memmapped(cfg: C.FileDataConfig, x_path: Path, y_path: Path, gen: torch.Generator) -> DataSet:
    """Memory-mapped ``.npy`` inputs and targets, split into train/val by row numbers: nothing but the targets is
    read here."""
    if not x_path.is_file():
        raise UserError(
            f"data.path={cfg.path!r} is a directory without x.npy: give a {FORMATS} file, or a directory holding "
            f"x.npy and {cfg.target}.npy"
        )
    if not y_path.is_file():
        found = ", ".join(sorted(p.name for p in y_path.parent.glob("*.npy"))) or "none"
        raise UserError(
            f"{x_path}: no {y_path.name} beside it for the target (data.target={cfg.target}); .npy files there: {found}"
        )
    x, y = open_array(x_path), open_array(y_path)
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"{x_path}: inputs must be a non-empty [N, features...] array, got shape {x.shape}")
    if y.shape[0] != x.shape[0] or (y.ndim > 1 and y.shape[1:] != (1,)):
        raise UserError(f"{y_path}: needs one target a row for the {x.shape[0]} rows of x.npy, got shape {y.shape}")
    targets = np.asarray(y).reshape(-1)  # one value a row: small beside the inputs, read whole for the checks
    if not np.isfinite(targets).all():
        raise UserError(f"{y_path}: contains NaN or infinite values")
    task, num_classes, labels, classes = _task(cfg, targets)
    rows = MemmapRows(x, labels if classes is not None else y)  # renumbered labels are held in memory
    train, val = split_dataset(rows, cfg.val_fraction, gen, task)
    return DataSet(train, {"": val}, task=task, num_classes=num_classes, classes=classes)


def _task(cfg: C.FileDataConfig, targets: np.ndarray) -> tuple[str, int, np.ndarray, list[float] | None]:
    """The task (``data.task``, else regression with a warning where the targets look like classes), the number of
    classes, the targets as class indices (renumbered where ``data.labels=remap``, the labels checked) and the
    value each renumbered class stands for (None where the file's labels are the indices)."""
    if cfg.task == "classification":
        classes = None
        if cfg.labels == "remap":
            targets, values = remap_labels(targets)
            classes = values.tolist()
        check_labels(f"data.path={cfg.path!r}", targets, remap_hint="data.labels=remap")
        return "classification", int(targets.max()) + 1, targets.astype(np.int64), classes
    if cfg.task is None and rank() == 0:
        _warn_if_classes(cfg.path, targets)
    return "regression", 0, targets, None


def _warn_if_classes(where: str, target: np.ndarray) -> None:
    """A target of a few whole numbers, in a run that did not say ``data.task``, is probably class labels."""
    if not np.array_equal(target, np.round(target)):  # one pass; the sort below only for whole numbers
        return
    values = np.unique(target)
    if 2 <= len(values) <= FEW_VALUES and len(values) < len(target) / 2:
        shown = f"{values[0]:g}..{values[-1]:g}"
        log.warning(
            "data.path=%s: the target holds only the whole numbers %s (%d values) and data.task is not set, so it "
            "trains as regression; if they are classes, set data.task=classification",
            where,
            shown,
            len(values),
        )


def read_features(cfg: C.FileDataConfig) -> np.ndarray:
    """The input rows of ``cfg.path``, for prediction: the inputs as training read them, the target (which may be
    absent) left out."""
    path = _existing_path(cfg)
    arrays = npy_paths(path, cfg.target)
    if arrays is not None:
        if not arrays[0].is_file():
            raise UserError(f"data.path={cfg.path!r} is a directory without x.npy")
        x = np.asarray(open_array(arrays[0]), dtype=np.float64)
    else:
        x, _, _ = _read(cfg, path, with_target=False)
    x = x[:, None] if x.ndim == 1 else x
    if not np.isfinite(x).all():
        raise UserError(f"data.path={cfg.path!r}: contains NaN or infinite values")
    return x


def _read(
    cfg: C.FileDataConfig, path: Path, with_target: bool
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """The inputs and the target of a ``.npz``, ``.csv`` or ``.parquet`` file as float64 arrays, and a table's input
    column names. Without ``with_target`` (prediction) the target may be absent."""
    if path.is_dir():
        raise UserError(
            f"data.path={cfg.path!r} is a directory, not a file: give a {FORMATS} file, or a directory holding x.npy "
            f"and {cfg.target}.npy"
        )
    suffix = _suffix(path)
    if suffix == ".npz":
        return (*_read_npz(path, cfg.target, with_target), None)
    if suffix not in (".csv", ".csv.gz", ".parquet"):
        raise UserError(f"data.path={cfg.path!r}: unsupported suffix {suffix!r}; use {FORMATS}")
    delimiter = None if suffix == ".parquet" else _sniff_delimiter(path)
    header = _parquet_columns(path) if delimiter is None else _csv_header(path, delimiter)
    _check_header(path, header)
    features = _feature_columns(cfg, path, header)
    has_target = cfg.target in header
    if with_target and not has_target:
        raise UserError(f"{path}: no column {cfg.target!r} (data.target); columns: {', '.join(header)}")
    columns = [*features, cfg.target] if has_target else features
    values = _read_parquet(path, columns) if delimiter is None else _read_csv_table(path, columns, delimiter)
    return (values[:, :-1], values[:, -1], features) if has_target else (values, None, features)


def _suffix(path: Path) -> str:
    """``.csv.gz`` where the file is a compressed CSV, else the last suffix, lower case."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    return "".join(suffixes) if suffixes == [".csv", ".gz"] else path.suffix.lower()


def _feature_columns(cfg: C.FileDataConfig, path: Path, header: list[str]) -> list[str]:
    """The input columns: ``data.features`` if given, else every column but the target and ``data.drop``."""
    named = [*(cfg.features or []), *cfg.drop]
    unknown = [name for name in named if name not in header]
    if unknown:
        raise UserError(f"{path}: no column {', '.join(map(repr, unknown))}; columns: {', '.join(header)}")
    if cfg.target in (cfg.features or []):
        raise UserError(f"data.features lists the target column {cfg.target!r} (data.target); leave it out")
    chosen = cfg.features or [name for name in header if name != cfg.target and name not in cfg.drop]
    if not chosen:
        raise UserError(f"{path}: no input columns left beside the target {cfg.target!r}")
    return chosen


def _read_npz(path: Path, target: str, with_target: bool) -> tuple[np.ndarray, np.ndarray | None]:
    needed = ("x", target) if with_target else ("x",)
    try:
        with np.load(path) as arrays:
            missing = [k for k in needed if k not in arrays]
            if missing:
                has = ", ".join(arrays.files) or "none"
                raise UserError(
                    f"{path}: no array {' or '.join(map(repr, missing))}; it has: {has}; "
                    f"a .npz needs {' and '.join(needed)} (data.target names the target)"
                )
            y = arrays[target].astype(np.float64) if with_target else None
            return arrays["x"].astype(np.float64), y
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


def _parquet_columns(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow's own error for a file that is not Parquet
        raise UserError(f"{path}: not a readable .parquet file ({first_line(exc)})") from None


def _read_parquet(path: Path, columns: list[str]) -> np.ndarray:
    """The ``columns`` of a Parquet file (only those are read), as one float64 array."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    frame = table.to_pandas()
    _check_numeric(path, frame, columns)
    # Arrow may hand back a read-only buffer; torch would warn about it and training needs its own rows anyway.
    return np.require(frame.to_numpy(dtype=np.float64), requirements="W")


def _check_numeric(path: Path, frame: Any, columns: list[str]) -> None:
    """A one-line error naming the first column that is not numbers, and a value in it."""
    import pandas as pd

    for name in columns:
        kind = frame[name].dtype
        if not pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind):
            coerced = pd.to_numeric(frame[name], errors="coerce")
            bad = frame[name][coerced.isna() & frame[name].notna()]
            example = f": {bad.iloc[0]!r} (row {int(bad.index[0]) + 1}) is not a number" if len(bad) else ""
            raise UserError(f"{path}: column {name!r} holds {kind} values{example}; dtrain trains on numbers")


DELIMITERS = (",", ";", "\t", "|")
INDEX_COLUMN_NAMES = ("", "Unnamed: 0")  # what pandas' to_csv writes above its index (and read_csv reads back)


def _read_csv_table(path: Path, columns: list[str] | None = None, delimiter: str | None = None) -> np.ndarray:
    """A numeric ``.csv`` (or ``.csv.gz``): its ``columns`` (default: all, in the header's order) as one float64
    array, read by pandas' C parser.

    pandas' C parser, because it measured fastest here: 0.52 s for 1M rows x 21 columns, against 2.5 s for
    pyarrow's parser with the conversion to one array and 14.2 s for Python's csv module, on 2 cores
    (benchmarks/csv_loading.py, docs/benchmarks.md). Only the chosen columns are parsed (``usecols``). The
    delimiter is the header line's most frequent of ``, ; TAB |``. Where pandas cannot give a table of numbers,
    the file is read again by Python's csv module, whose one-line error names the line and column."""
    delimiter = delimiter or _sniff_delimiter(path)
    try:
        import pandas as pd

        wanted = None if columns is None else set(columns)
        use = None if wanted is None else (lambda name: str(name).strip() in wanted)  # names as the header has them
        frame = pd.read_csv(path, sep=delimiter, encoding="utf-8-sig", engine="c", usecols=use)
        frame.columns = [str(name).strip() for name in frame.columns]
        if columns is not None and list(frame.columns) != columns:
            frame = frame[columns]  # data.features' order (a copy: only where the order differs)
    except Exception:  # a parser or decoding error: the careful reader says what is wrong, and where
        return _read_csv_slowly(path, delimiter, columns)
    numeric = all(pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind) for kind in frame.dtypes)
    if len(frame) == 0 or not numeric:
        return _read_csv_slowly(path, delimiter, columns)
    return frame.to_numpy(dtype=np.float64, copy=False)


def _open_text(path: Path) -> Any:
    """A CSV as text (UTF-8, a byte-order mark dropped), decompressed where it is ``.csv.gz``."""
    if _suffix(path) == ".csv.gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return path.open(newline="", encoding="utf-8-sig")


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The header row's names, split at ``delimiter``."""
    try:
        with _open_text(path) as handle:
            first = next(csv.reader(handle, delimiter=delimiter), [])
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a UTF-8 text file ({first_line(exc)}); a .csv must be UTF-8 text") from None
    return [name.strip() for name in first]


def _sniff_delimiter(path: Path) -> str:
    try:
        with _open_text(path) as handle:
            first = handle.readline()
    except (UnicodeDecodeError, OSError, EOFError):
        return ","  # the header's own reading says what is wrong
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _check_header(path: Path, header: list[str]) -> None:
    if header and header[0] in INDEX_COLUMN_NAMES:
        raise UserError(
            f"{path}: the first column has no name ({header[0]!r}): a pandas index written by to_csv? Write the "
            "file with to_csv(index=False), or name the column"
        )


def _read_csv_slowly(path: Path, delimiter: str, columns: list[str] | None = None) -> np.ndarray:
    """Python's csv module, cell by cell: slow, but its errors name the line and the column."""
    try:
        with _open_text(path) as handle:
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]  # blank lines carry no data
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a .csv must be UTF-8 text") from None
    if len(rows) < 2:
        raise UserError(f"{path}: a .csv needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    _check_header(path, header)
    wanted = [header.index(name) for name in columns] if columns is not None else list(range(len(header)))
    values = np.empty((len(rows) - 1, len(wanted)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(
                f"{path}:{i}: {len(row)} fields, but the header has {len(header)} (delimiter {delimiter!r})"
            )
        for k, j in enumerate(wanted):
            try:
                values[i - 2, k] = float(row[j])
            except ValueError:
                raise UserError(f"{path}:{i}: column {header[j]!r}: {row[j].strip()!r} is not a number") from None
    return values
