"""Training time apart from time set aside (evaluation, figures, checkpoints), so throughput counts training.

The loop's device work is asynchronous: a lap read at a logging step (right after that step's host sync)
is the real time of the steps since the previous lap. Evaluation and checkpoints end in host syncs of
their own, so their measured time is their real cost too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Wall time and training time since :meth:`start`, plus what earlier attempts (a resumed run) spent."""

    def __init__(self, prior_train_s: float = 0.0, prior_wall_s: float = 0.0) -> None:
        self.prior_train_s = prior_train_s
        self.prior_wall_s = prior_wall_s
        self.start()

    def start(self) -> None:
        """Start (or restart) timing now: the lap starts too."""
        self.began = self.lap_began = time.perf_counter()
        self.aside_in_lap = 0.0  # seconds set aside since the lap began
        self.aside_before_lap = 0.0  # seconds set aside in earlier laps

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Time spent inside is not training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.aside_in_lap += time.perf_counter() - started

    def lap(self) -> float:
        """Training seconds since the previous lap (or the start); a new lap begins."""
        now = time.perf_counter()
        seconds = now - self.lap_began - self.aside_in_lap
        self.aside_before_lap += self.aside_in_lap
        self.aside_in_lap = 0.0
        self.lap_began = now
        return seconds

    def wall_s(self) -> float:
        """Wall seconds over every attempt."""
        return self.prior_wall_s + time.perf_counter() - self.began

    def train_s(self) -> float:
        """Training seconds over every attempt: wall time less the time set aside."""
        now = time.perf_counter()
        return self.prior_train_s + now - self.began - self.aside_before_lap - self.aside_in_lap
