"""The best model and early stopping: both watch ``objective.metric`` at each evaluation.

Validation metrics are reduced across ranks before anyone looks at them, so every rank reaches the same
verdict at the same step without a collective of its own. What they remember lives in :class:`Progress`,
so a resumed run keeps the same best and stops at the same step.
"""

from __future__ import annotations

import logging
import math

from dtrain.config import Config
from dtrain.results import objective_metric
from dtrain.train.state import Progress

log = logging.getLogger("dtrain")


class ObjectiveWatch:
    """Tracks ``objective.metric``: the best value so far (``checkpoint.save_best``) and the evaluations since it
    last improved by more than ``trainer.early_stopping.min_delta`` (Lightning's ``EarlyStopping`` rule)."""

    def __init__(self, config: Config) -> None:
        self.metric, self.mode = config.objective.metric, config.objective.mode
        self.save_best = config.checkpoint.save_best
        self.patience = config.trainer.early_stopping.patience
        self.min_delta = config.trainer.early_stopping.min_delta
        self.active = self.save_best or self.patience > 0
        self.key = f"{self.metric}:{self.mode}"

    def adopt(self, progress: Progress) -> None:
        """Take over a (resumed) progress: if it watched another objective, its best and patience start over."""
        if progress.watched and progress.watched != self.key:
            log.info(
                "objective is now %s (was %s): the best model and early stopping start over", self.key, progress.watched
            )
            progress.best_value, progress.best_step, progress.stop_best = None, -1, None
            progress.evals_without_improvement, progress.stopped_early = 0, False
        progress.watched = self.key

    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if than is None:
            return True
        return value < than - margin if self.mode == "min" else value > than + margin

    def observe(self, progress: Progress, metrics: dict[str, float]) -> bool:
        """Take this evaluation into account; whether it is the best so far (a new ``model_best.pt`` is due).

        A non-finite value is never an improvement."""
        tag = objective_metric(self.metric, metrics)
        value = metrics.get(tag)
        finite = value is not None and math.isfinite(value)
        if self.patience > 0:
            if finite and self._better(value, progress.stop_best, self.min_delta):
                progress.stop_best, progress.evals_without_improvement = value, 0
            else:
                progress.evals_without_improvement += 1
            progress.stopped_early = progress.evals_without_improvement >= self.patience
        if finite and self._better(value, progress.best_value, 0.0):
            progress.best_value, progress.best_step = value, progress.step
            return True
        return False

    def stop_message(self, progress: Progress) -> str:
        tag = objective_metric(self.metric, progress.metrics)
        best = (
            f"best {progress.best_value:.6g} at step {progress.best_step}"
            if progress.best_value is not None
            else "no evaluation had a finite value"
        )
        return (
            f"early stopping after step {progress.step}: {tag} has not improved by more than "
            f"{self.min_delta:g} for {self.patience} evaluations ({best})"
        )
