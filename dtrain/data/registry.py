"""Data sets built from config: a small registry from ``data.name`` to a builder, as ``dtrain.models`` has for
models. The builders live in their own modules (synthetic sets, files) and import only :mod:`dtrain.data.dataset`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dtrain.data import files, synthetic
from dtrain.data.dataset import DataSet

BUILDERS: dict[str, Callable[..., DataSet]] = {
    "poly2d": synthetic.poly2d,
    "poly1d": synthetic.poly1d,
    "sine": synthetic.sine,
    "moons": synthetic.moons,
    "file": files.load,
}


def build_dataset(cfg: object, seed: int) -> DataSet:
    """Build the data set that ``cfg`` (one of the ``data/`` schemas) describes, on the CPU in float64."""
    name = cfg.name  # type: ignore[attr-defined]
    if name not in BUILDERS:
        raise TypeError(f"no data set named {name!r}")
    return BUILDERS[name](cfg, torch.Generator().manual_seed(seed))
