"""Class labels checked before training: the indices 0..K-1, each used, and not a regression target in disguise."""

from __future__ import annotations

import numpy as np

from dtrain.errors import UserError

# More classes than this with fewer rows than this per class on average: a regression target given as classes
# (the diabetes target as classification: 214 "classes" in 442 rows).
MANY_CLASSES, FEW_ROWS_PER_CLASS = 10, 5


def remap_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any values (``[3, 7, 7, 9]``) as class indices in sorted order (``[0, 1, 1, 2]``), and the values
    each index stands for (``[3, 7, 9]``), which predictions map back to."""
    classes, indices = np.unique(labels, return_inverse=True)
    return indices.reshape(labels.shape), classes


def check_labels(where: str, labels: np.ndarray, remap_hint: str = "") -> None:
    """Class labels must be the indices 0..K-1, each used, with fewer classes than makes sense for the rows.
    ``remap_hint``: how this source can renumber them instead (``data.labels=remap`` for files)."""
    if len(labels) == 0:
        raise UserError(f"{where}: no rows: there is nothing to train on")
    if not np.all(labels == np.round(labels)):
        raise UserError(
            f"{where}: classification targets must be class indices 0..K-1, and some are not whole "
            "numbers (a regression target? then data.task=regression)"
        )
    found = np.unique(labels).astype(np.int64)
    k = len(found)
    rows = len(labels)
    if k > MANY_CLASSES and rows / k < FEW_ROWS_PER_CLASS:
        raise UserError(
            f"{where}: data.task=classification but the target has {k} distinct values in {rows} rows: "
            "is it a regression target? (data.task=regression)"
        )
    if found[0] != 0 or found[-1] != k - 1:
        shown = f"{found[0]}..{found[-1]}" if found[-1] - found[0] == k - 1 else ", ".join(map(str, found[:6]))
        fix = f"subtract {found[0]} from every label" if found[-1] - found[0] == k - 1 else "renumber them"
        fix += f", or add {remap_hint}" if remap_hint else ""
        raise UserError(
            f"{where}: labels {shown} ({k} classes); dtrain expects class indices 0..K-1, here 0..{k - 1}: {fix}"
        )
