"""What the loop accumulates between logging steps, and the values it logs at them.

Between logging steps the loss is summed on the device (no host sync). At a logging step one
collective reduces the loss sum and anything else that must be agreed on (the stop-signal flag rides
along for free), and one host copy fetches it with the step statistics; then come the throughput and
step time from the stopwatch's lap.
"""

from __future__ import annotations

import math

import torch

from dtrain.dist import DistEnv, all_reduce_sum, current_op
from dtrain.train.monitor import StepMonitor
from dtrain.train.state import Progress
from dtrain.train.stopwatch import Stopwatch


class LogWindow:
    """The steps since the last logging step: their loss sum on the device, reduced and packed when logged."""

    def __init__(self, monitor: StepMonitor, env: DistEnv, global_batch: int, dtype: torch.dtype) -> None:
        self.monitor = monitor
        self.env = env
        self.global_batch = global_batch
        # Kept in the weights' dtype (float32 or float64): a dtype conversion every step costs measurably.
        self.loss_sum = torch.zeros((), dtype=dtype, device=env.device)
        self.sums = {"loss": self.loss_sum, "clipped": monitor.clipped}  # what a checkpoint keeps of the window

    def add(self, step_loss: torch.Tensor, progress: Progress) -> None:
        """A step whose loss counts (a skipped step's does not)."""
        self.loss_sum += step_loss
        progress.losses_since_log += 1

    def close(
        self, step: int, lr: float, skipped: bool, progress: Progress, stopwatch: Stopwatch, riders: list[float]
    ) -> tuple[dict[str, float], list[float]]:
        """The window's values to log after ``step`` (a collective: every rank calls it at the same steps),
        and ``riders`` summed across ranks; the time since the stopwatch's last lap is the window's."""
        current_op("metrics all-reduce", step)
        device_values = [self.loss_sum, *(self.loss_sum.new_tensor(r) for r in riders)]
        reduced = all_reduce_sum(torch.stack(device_values), self.env)
        # Gradient norms need no reduction: after the all-reduce every rank holds the same gradients.
        stats, tags = self.monitor.device_values() if not skipped else (reduced.new_zeros(0), [])
        host = torch.cat([reduced.double(), stats.to(reduced.device)]).tolist()
        seconds = stopwatch.lap()  # after the host copy: the steps' real time
        steps = progress.steps_since_log
        values = {
            "train/loss": host[0] / (max(progress.losses_since_log, 1) * self.env.world_size),
            "lr": lr,
            "perf/samples_per_sec": steps * self.global_batch / max(seconds, 1e-9),
            "perf/step_time_ms": 1e3 * seconds / steps,
        }
        stat = dict(zip(tags, host[1 + len(riders) :], strict=True))
        norms = [v for k, v in stat.items() if k.startswith("grad_norm/")]
        if norms:
            values["grad_norm/total"] = math.sqrt(sum(v * v for v in norms))
        if "clipped_steps" in stat:
            values["train/clipped_fraction"] = stat.pop("clipped_steps") / max(progress.losses_since_log, 1)
        values.update(stat)
        if self.env.device.type == "cuda":
            values["perf/gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 1e9
        if progress.skipped_steps:
            values["train/skipped_steps"] = float(progress.skipped_steps)
        return values, host[1 : 1 + len(riders)]

    def reset(self, progress: Progress) -> None:
        """Start the next window."""
        self.loss_sum.zero_()
        self.monitor.reset()
        progress.steps_since_log = progress.losses_since_log = 0
