"""Data sets built from config: a small registry from ``data.name`` to a builder, as ``dtrain.models`` has for
models. The builders live in their own modules (synthetic sets, files, a user's own)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dtrain.data import files, synthetic
from dtrain.data.dataset import DataSet
from dtrain.data.loader import EMPTY_TRAINING_SPLIT
from dtrain.data.standardize import Standardizer, fit_standardizer
from dtrain.data.user import load_user_data
from dtrain.errors import ConfigError

BUILDERS: dict[str, Callable[..., DataSet]] = {
    "poly2d": synthetic.poly2d,
    "poly1d": synthetic.poly1d,
    "sine": synthetic.sine,
    "moons": synthetic.moons,
    "file": files.load,
    "custom": load_user_data,  # data._target_: a user's function or class
}


def build_dataset(cfg: object, seed: int) -> DataSet:
    """Build the data set that ``cfg`` (one of the ``data/`` schemas) describes, on the CPU in float64."""
    name = cfg.name  # type: ignore[attr-defined]
    if name not in BUILDERS:
        raise TypeError(f"no data set named {name!r}")
    return BUILDERS[name](cfg, torch.Generator().manual_seed(seed))


def build_training_data(
    cfg: object,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[DataSet, Standardizer | None]:
    """The data set as the model trains on it: built, then standardised where ``data.standardize`` says so, by
    statistics of the training split (each rank sums its shard; ``reduce``, an all-reduce sum, adds them up).
    The generated data sets have no ``standardize``: they are built at the scale they are meant to be learnt at."""
    data = build_dataset(cfg, seed)
    if len(data.train) == 0:  # before the statistics, which need a row
        raise ConfigError(EMPTY_TRAINING_SPLIT)
    choice = getattr(cfg, "standardize", False)
    if choice is False:
        return data, None
    targets = choice is True and data.task == "regression"
    standardizer = fit_standardizer(data.train, targets, rank, world_size, reduce)
    return standardizer.apply(data), standardizer
