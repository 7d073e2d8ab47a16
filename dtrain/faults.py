"""Faults injected on purpose (``fault.kind``), so that tests and users can watch recovery work."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable

from dtrain.config import FaultConfig

log = logging.getLogger("dtrain")


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Faults:
    """Decides whether the configured fault fires on this rank, and fires it."""

    def __init__(self, cfg: FaultConfig, rank: int) -> None:
        self.cfg = cfg
        self.armed = cfg.kind != "none" and cfg.rank == rank and (cfg.attempts == "every" or restart_count() == 0)

    def poisons(self, step: int) -> bool:
        """``fault.kind=nan``: whether optimizer step ``step`` (1-based) gets a NaN loss on this rank."""
        return self.armed and self.cfg.kind == "nan" and step == self.cfg.step

    def loss_scale(self, step: int) -> float:
        """What step ``step``'s loss (and so its gradients) is multiplied by on this rank: NaN where it is
        poisoned, else 1."""
        return math.nan if self.poisons(step) else 1.0

    def after_step(self, step: int, stop_requested: Callable[[], bool]) -> None:
        """Fire kill/exit/hang once ``step`` steps are done (and checkpointed, if one was due)."""
        if not self.armed or step != self.cfg.step or self.cfg.kind == "nan":
            return
        print(f"dtrain: fault.kind={self.cfg.kind} fires on this rank after step {step}", file=sys.stderr, flush=True)
        if self.cfg.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.kind == "exit":
            os._exit(1)
        # hang: stop answering the peers, as a stuck rank would, until a signal says to go (torchrun's SIGTERM
        # after a peer failed); then leave at once, as the process a real hang ends in would be killed.
        while not stop_requested():
            time.sleep(0.05)
        os._exit(128 + signal.SIGTERM)
