"""What a non-finite loss or gradient does to a run: ``trainer.on_nonfinite=stop`` (the default) or ``skip``.

``stop`` costs nothing between logging steps: a non-finite loss makes the loss sum non-finite and a
non-finite gradient the gradient norm, and both are looked at where the loop syncs anyway. ``skip`` must
decide before each optimizer step, so it pays one collective and one host sync a step: the ranks agree
on finiteness and all of them skip the same steps.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from dtrain.config import OptimConfig, TrainerConfig
from dtrain.dist import DistEnv, all_reduce_sum, current_op
from dtrain.train.grads import local
from dtrain.train.state import Progress

log = logging.getLogger("dtrain")


class StopTraining(Exception):
    """Raised inside the loop to end the run early: ``status`` (``diverged`` or ``preempted``) and why."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def divergence_hint(optim: OptimConfig, trainer: TrainerConfig) -> str:
    """What to try when a run diverges."""
    hint = f"lower the learning rate (optim.lr={optim.lr:g})"
    if trainer.clip_grad_norm is None and trainer.clip_grad_value is None:
        hint += " or clip gradients (trainer.clip_grad_norm=1.0)"
    return hint


class NonFinitePolicy:
    """Decides, per the configured policy, whether a step is skipped and when the run has diverged."""

    def __init__(self, trainer: TrainerConfig, optim: OptimConfig, params: list[nn.Parameter], env: DistEnv) -> None:
        self.skips = trainer.on_nonfinite == "skip"
        self.max_skipped = trainer.max_skipped_steps
        self.hint = divergence_hint(optim, trainer)
        self.params = params
        self.env = env

    def skip(self, step_loss: torch.Tensor, step: int, progress: Progress) -> bool:
        """Under ``skip``: whether this step's loss or gradients are non-finite on any rank (then the step is
        skipped and counted); raises :class:`StopTraining` after more than ``max_skipped_steps`` in a row.
        Under ``stop``: False, at no cost."""
        if not self.skips:
            return False
        if all_finite(step_loss, self.params, self.env, step):
            progress.skipped_in_a_row = 0
            return False
        progress.skipped_in_a_row += 1
        progress.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient on some rank: step skipped", step)
        if progress.skipped_in_a_row > self.max_skipped:
            raise StopTraining(
                "diverged",
                f"training diverged: {progress.skipped_in_a_row} steps in a row had a non-finite loss or "
                f"gradient, more than trainer.max_skipped_steps={self.max_skipped} (the last at step {step}); "
                f"{self.hint}",
            )
        return True

    def check_logged(self, after: int, step: int, values: dict[str, float]) -> None:
        """At a logging step: raise :class:`StopTraining` if the loss or gradient norm logged for steps
        ``after + 1 .. step`` is non-finite."""
        if all(math.isfinite(values[k]) for k in ("train/loss", "grad_norm/total") if k in values):
            return
        where = f"at step {step}" if after + 1 == step else f"between steps {after + 1} and {step}"
        grad = values.get("grad_norm/total", math.nan)
        raise StopTraining(
            "diverged",
            f"training diverged: non-finite loss or gradient {where} "
            f"(train/loss={values['train/loss']:.4g}, grad_norm/total={grad:.4g}); "
            f"the step size is likely too large for this problem: {self.hint}",
        )


def all_finite(step_loss: torch.Tensor, params: list[nn.Parameter], env: DistEnv, step: int) -> bool:
    """Whether this step's loss on every rank and the (all-reduced) gradients, or every rank's shards of them,
    are finite: the same answer on every rank, from one collective."""
    grads = [local(p.grad) for p in params if p.grad is not None]  # under FSDP each rank checks its shards
    loss = step_loss.detach().double().sum()
    local_sum = torch.stack([loss, *(g.double().sum().to(loss.device) for g in grads)]).sum()  # offloaded: host
    bad = (~torch.isfinite(local_sum)).to(torch.float64).reshape(1)
    current_op("non-finite check all-reduce", step)
    return all_reduce_sum(bad, env).item() == 0
