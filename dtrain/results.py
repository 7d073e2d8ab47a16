"""A run's results: what ``dtrain.run.train`` returns, ``metrics.json``, and the objective read from it.

Kept free of torch and the trainer, so a sweep's launcher process can score trials cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class PopulationFit:
    """How a population's members ended (this rank's, or every rank's gathered on rank 0), as plain lists in
    member order."""

    status: list[str]  # completed | diverged
    steps: list[int]  # steps trained (a diverged member: the step whose loss or gradient was non-finite)
    metrics: list[dict[str, float]]
    first_loss: list[float]  # the first step's loss: lr-find compares the last losses with it
    min_loss: list[float]
    last_loss: list[float]  # the last step's loss (of the step that froze a diverged member: non-finite)
    total_steps: int
    wall_time_s: float
    member_samples_per_sec: float  # samples x (this rank's) members per second of training


@dataclass
class RunResult:
    """How a run (single or population) ended, on this rank."""

    status: str  # completed | diverged | preempted
    run_dir: Path
    summary: dict[str, Any]  # what metrics.json holds (on rank 0; elsewhere just the status)
    message: str = ""  # why it ended early, one line (diverged, preempted)
    table: str = ""  # the end-of-run table for the console (rank 0)
    population: PopulationFit | None = None  # every member's results (rank 0 of a population run)

    def objective(self, metric: str = "auto", mode: str = "min") -> float:
        """The number a sweeper optimises (:func:`objective_value`)."""
        return objective_value(self.summary, metric, mode)


def hparam_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The final metrics the HParams dashboard compares runs by: losses, accuracies, throughput, time."""
    keep = ("train/", "val/")
    return {
        k: v
        for k, v in summary.items()
        if isinstance(v, float) and (k.startswith(keep) or k in ("samples_per_sec", "wall_time_s"))
    }


def metrics_json(summary: Mapping[str, Any]) -> str:
    """``metrics.json``'s text: strict JSON, a non-finite value (a diverged loss) written as null."""
    return json.dumps(finite_or_none(dict(summary)), indent=2, allow_nan=False) + "\n"


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
