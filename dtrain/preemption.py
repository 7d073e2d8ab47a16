"""Preemption: SIGTERM and SIGUSR1 ask the run to save a checkpoint and exit at the next step boundary.

The handler only records the signal. The ranks must stop at the same step even when the signal reached
them at different times, so they agree on it where they already meet: each logging step's metrics
all-reduce carries every rank's flag (:meth:`Preemption.flag`, :meth:`Preemption.observe`) at no extra
cost. Where logging steps are far apart, the cadence also asks for an own, asynchronous agreement every
``checkpoint.signal_check_every`` steps (:meth:`Preemption.agreed`), which bounds the wait. One process
needs no agreement and looks at its flag every step. SLURM sends SIGUSR1 before a time limit
(``--signal=USR1@90``); torchrun's agent forwards SIGTERM to its workers and kills them 30 s later.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as torch_dist

from dtrain.dist import DistEnv, current_op
from dtrain.launch_env import STOP_SIGNALS

log = logging.getLogger("dtrain")
# SIGUSR2: hydra-submitit-launcher's time-limit signal (SLURM sends it signal_delay_s before the limit).
SIGNALS = STOP_SIGNALS


class Preemption:
    """Installs the handlers while the run trains (a context manager) and answers whether to stop."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.received: int | None = None
        self._agreed = False  # a logging step's all-reduce showed a flag on some rank
        self._previous: dict[int, object] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None  # (work, flag) of the last check

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        previous = dict(self._previous)
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        # The handler we displaced gets the signal once the checkpoint is saved: under submitit, task 0's
        # handler requeues the trial's job, which then resumes from that checkpoint.
        displaced = previous.get(self.received) if self.received is not None else None
        if callable(displaced) and exc[0] is None:
            displaced(self.received, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def flag(self) -> float:
        """This rank's flag for a logging step's all-reduce: 1 once a stop signal arrived here, else 0."""
        return 0.0 if self.received is None else 1.0

    def observe(self, flags: float) -> None:
        """The flags summed over every rank at a logging step: any stop signal anywhere makes the ranks agree."""
        if flags > 0:
            self._agreed = True

    def agreed(self, step: int, check_now: bool = True) -> bool:
        """Whether to stop after ``step``: the same answer on every rank, called by every rank at every step.

        True once a logging step carried some rank's flag. Besides, where ``check_now`` (the cadence's
        own check) each rank starts a one-element all-reduce (MAX) of its flag on a CPU gloo group,
        asynchronously, and reads the one it started at the previous own check: nobody waits for the round
        trip, and it never waits for the GPU's queue. All ranks start and read the same collectives.
        """
        if not self.env.distributed:
            return self.received is not None
        if self._agreed:
            return True
        if not check_now:
            return False
        if self._pending is not None:
            work, flag = self._pending
            current_op("preemption-signal agreement", step)
            work.wait()
            self._pending = None
            if flag.item():
                self._agreed = True
                return True
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        work = torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.env.cpu_group, async_op=True)
        self._pending = (work, flag)
        return False

    def finish(self) -> None:
        """Wait for the agreement still in flight (every rank started it), before the group goes away."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    @property
    def signal_name(self) -> str:
        """The received signal's name (SIGTERM, SIGUSR1), or ``a peer rank's signal`` if only a peer got one."""
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"
