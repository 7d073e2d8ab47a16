"""A user's own data set: ``data._target_`` called with the arguments beside it (docs/data.md).

The function (or class) returns one of

* ``(x, y)``: tensors or arrays, split by ``data.val_fraction``; they take the in-memory fast path;
* ``(x, y, x_val, y_val)``: the same, with the user's own validation rows;
* a map-style ``Dataset`` of ``(input, target)`` items, split by ``data.val_fraction``;
* ``(train_dataset, val_dataset)``: read through a DataLoader with ``data.num_workers`` worker processes.

Integer targets mean classification (class indices 0..K-1) unless ``data.task`` says otherwise; a Dataset's
classes come from its ``classes`` attribute (torchvision's), ``data.num_classes``, or its ``targets``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from dtrain.config import UserDataConfig
from dtrain.data.dataset import DataSet, DatasetSplit, Split, split_dataset, split_train_val
from dtrain.data.labels import check_labels
from dtrain.errors import ConfigError, first_line
from dtrain.user_code import call_with, import_target, instantiate_args

KEY = "data._target_"
FORMS = "(x, y), (x, y, x_val, y_val), a Dataset, or (train_dataset, val_dataset)"


def load_user_data(cfg: UserDataConfig, gen: torch.Generator) -> DataSet:
    """Call the user's function and make a :class:`DataSet` of what it returns, or refuse it in one line."""
    factory = import_target(cfg.target, KEY)
    if not callable(factory):
        raise ConfigError(f"{KEY}={cfg.target!r} is a {type(factory).__name__}, not a function or a class")
    result = call_with(factory, instantiate_args(cfg.args, KEY), KEY, cfg.target)
    parts = list(result) if isinstance(result, (tuple, list)) else [result]
    if any(isinstance(p, IterableDataset) for p in parts):
        raise ConfigError(
            f"{KEY}={cfg.target!r} returned an IterableDataset, which has neither a length nor rows to shard and "
            "resume at: dtrain needs a map-style Dataset (__getitem__ and __len__) or tensors"
        )
    if all(_is_dataset(p) for p in parts) and len(parts) in (1, 2):
        return _from_datasets(cfg, parts, gen)
    if all(_is_array(p) for p in parts) and len(parts) in (2, 4):
        return _from_tensors(cfg, [_as_tensor(cfg, p, i) for i, p in enumerate(parts)], gen)
    got = type(result).__name__
    if isinstance(result, (tuple, list)):
        got += " of " + ", ".join(type(p).__name__ for p in parts)
    raise ConfigError(f"{KEY}={cfg.target!r} returned a {got}; it must return {FORMS}")


def _is_dataset(obj: Any) -> bool:
    """A torch ``Dataset``, or anything map-style with ``__getitem__`` and ``__len__`` that is not plain data."""
    if isinstance(obj, Dataset):
        return True
    plain = isinstance(obj, (str, bytes, dict, tuple, list)) or _is_array(obj)
    return not plain and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _is_array(obj: Any) -> bool:
    """Tensors, NumPy arrays, and what converts to one (a pandas DataFrame or Series: ``__array__``)."""
    return isinstance(obj, (torch.Tensor, np.ndarray)) or (hasattr(obj, "__array__") and not isinstance(obj, Dataset))


PART_NAMES = ("x", "y", "x_val", "y_val")


def _as_tensor(cfg: UserDataConfig, part: Any, index: int) -> torch.Tensor:
    """One returned array as a CPU tensor; a table of text (an object array) refused in one line."""
    if isinstance(part, torch.Tensor):
        return part.detach().cpu()
    if hasattr(part, "to_numpy") and hasattr(part, "dtypes" if hasattr(part, "columns") else "dtype"):
        return torch.as_tensor(_pandas_numbers(cfg, part, PART_NAMES[index]))
    array = np.asarray(part)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ConfigError(
            f"{KEY}={cfg.target!r}: {PART_NAMES[index]} holds {array.dtype} values, not numbers: convert or encode "
            "them (e.g. pandas' get_dummies) before returning"
        )
    return torch.as_tensor(array)


def _from_tensors(cfg: UserDataConfig, arrays: list[torch.Tensor], gen: torch.Generator) -> DataSet:
    """In-memory splits: inputs as float64, targets as class indices or float64 columns."""
    task = cfg.task or ("classification" if _integer(arrays[1]) else "regression")
    pairs = [(arrays[i], arrays[i + 1]) for i in range(0, len(arrays), 2)]
    for i, (xs, ys) in enumerate(pairs):
        if xs.ndim == 0 or ys.ndim == 0 or xs.shape[0] != ys.shape[0]:
            which = "x, y" if i == 0 else "x_val, y_val"
            raise ConfigError(
                f"{KEY}={cfg.target!r}: {which} must have one row per sample; got shapes "
                f"{list(xs.shape)} and {list(ys.shape)}"
            )
    if len(pairs) == 2:
        _check_like(cfg, [list(p.shape[1:]) for p in arrays[::2]], [list(p.shape[1:]) for p in arrays[1::2]])
    converted = [(xs.to(torch.float64), _targets(cfg, ys, task)) for xs, ys in pairs]
    num_classes = 0
    if task == "classification":
        labels = torch.cat([ys for _, ys in converted])
        check_labels(f"{KEY}={cfg.target!r}", labels.cpu().numpy())
        num_classes = int(labels.max()) + 1
    if len(converted) == 2:
        train, val = Split(*converted[0]), Split(*converted[1])
    else:
        train, val = split_train_val(*converted[0], cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task=task, num_classes=num_classes)


def _pandas_numbers(cfg: UserDataConfig, part: Any, name: str) -> np.ndarray:
    """A pandas DataFrame or Series as one array, column by column checked: numbers and booleans (get_dummies'
    columns) become float64, whole numbers stay integers (class labels); a text column is refused by name."""
    from pandas.api.types import is_bool_dtype, is_integer_dtype, is_numeric_dtype

    kinds = dict(part.dtypes.items()) if hasattr(part, "columns") else {part.name: part.dtype}
    text = [str(column) for column, kind in kinds.items() if not (is_numeric_dtype(kind) or is_bool_dtype(kind))]
    if text:
        raise ConfigError(
            f"{KEY}={cfg.target!r}: {name} has columns that are not numbers ({', '.join(text[:5])}): convert or encode "
            "them (e.g. pandas' get_dummies) before returning"
        )
    whole = all(is_integer_dtype(kind) and not is_bool_dtype(kind) for kind in kinds.values())
    try:
        return part.to_numpy(dtype=np.int64 if whole else np.float64)
    except (TypeError, ValueError) as exc:  # a missing value in a nullable integer column
        raise ConfigError(f"{KEY}={cfg.target!r}: {name} cannot be made numbers: {first_line(exc)}") from None


def _check_like(cfg: UserDataConfig, inputs: list[list[int]], targets: list[list[int]]) -> None:
    """Validation rows shaped as the training rows (a row's input, and its target), or one line naming both. One
    target value a row is one shape, whether given as [] (a scalar, a Series) or [1] (a column)."""
    targets = [[] if shape == [1] else shape for shape in targets]
    if inputs[1] != inputs[0] or targets[1] != targets[0]:
        raise ConfigError(
            f"{KEY}={cfg.target!r}: the validation rows have inputs {inputs[1]} and targets {targets[1]} a row, the "
            f"training rows {inputs[0]} and {targets[0]}: they must match"
        )


def _integer(y: torch.Tensor) -> bool:
    return not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def _targets(cfg: UserDataConfig, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        if y.ndim > 1 and y.shape[1:].numel() != 1:
            raise ConfigError(f"{KEY}={cfg.target!r}: classification needs one label per row, y has {list(y.shape)}")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise ConfigError(
                f"{KEY}={cfg.target!r}: data.task=classification but the targets are not whole numbers "
                "(class indices 0..K-1)"
            )
        return y.reshape(-1).to(torch.long)
    y = y.to(torch.float64)
    return y[:, None] if y.ndim == 1 else y


def _from_datasets(cfg: UserDataConfig, datasets: list[Any], gen: torch.Generator) -> DataSet:
    """Splits read through a DataLoader: the task from the first item's target, the classes as the dataset says."""
    train_set = datasets[0]
    if len(train_set) == 0:
        raise ConfigError(f"{KEY}={cfg.target!r} returned an empty Dataset")
    item = train_set[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ConfigError(
            f"{KEY}={cfg.target!r}: the Dataset's items must be (input, target) pairs; item 0 is a "
            f"{type(item).__name__}"
        )
    target = torch.as_tensor(item[1])
    task = cfg.task or ("classification" if _integer(target) and target.ndim == 0 else "regression")
    num_classes = _num_classes(cfg, train_set) if task == "classification" else 0
    if len(datasets) == 2:
        if len(datasets[1]) > 0:
            pair = (item, datasets[1][0])
            inputs = [list(torch.as_tensor(p[0]).shape) for p in pair]
            _check_like(cfg, inputs, [list(torch.as_tensor(p[1]).shape) for p in pair])
        train, val = DatasetSplit(train_set, task=task), DatasetSplit(datasets[1], task=task)
    else:
        train, val = split_dataset(train_set, cfg.val_fraction, gen, task)
    return DataSet(train, {"": val}, task=task, num_classes=num_classes)


def _num_classes(cfg: UserDataConfig, dataset: Any) -> int:
    """``data.num_classes``, else the Dataset's ``classes`` (torchvision's convention), else its ``targets``."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    if hasattr(dataset, "targets"):
        labels = np.asarray(dataset.targets)
        check_labels(f"{KEY}={cfg.target!r}", labels)
        return int(labels.max()) + 1
    raise ConfigError(
        f"{KEY}={cfg.target!r}: a classification Dataset needs its number of classes: set data.num_classes=K, or "
        "give the Dataset a `classes` list or a `targets` array"
    )
