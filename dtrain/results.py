"""A run's results as a sweep sees them: ``metrics.json`` and the objective read from it.

Kept free of torch and the trainer, so a sweep's launcher process can score trials cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def objective_metric(metric: str, summary: Mapping[str, Any]) -> str:
    """The tag ``metric`` names: ``auto`` is ``val/loss`` where the run has one, else ``train/loss``."""
    if metric != "auto":
        return metric
    return "val/loss" if summary.get("val/loss") is not None else "train/loss"


def objective_value(summary: Mapping[str, Any], metric: str = "auto", mode: str = "min") -> float:
    """The number a sweeper optimises; the worst possible value (inf for min, -inf for max) for a run
    that did not complete or lacks the metric, so one failed trial never looks best."""
    worst = math.inf if mode == "min" else -math.inf
    if summary.get("status") != "completed":
        return worst
    value = summary.get(objective_metric(metric, summary))
    if not isinstance(value, int | float) or not math.isfinite(value):
        return worst
    return float(value)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged loss), also inside dicts and lists, as None: what
    strict JSON can hold."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``metrics.json``; empty when the run wrote none (it failed before the end)."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
