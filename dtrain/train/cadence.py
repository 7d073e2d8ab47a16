"""When things happen in a run: logging, evaluation, checkpoints, figures, the ranks' signal check, epoch ends.

One :class:`Cadence` answers for the single-run loop and the population loop alike, so the two cannot
drift apart: a population member logs and evaluates at the steps its own single run does. Every answer
is a pure function of the step (and of the last evaluation), the same on every rank, so the ranks
enter the collectives that go with these events together.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.config import Config, TrainerConfig

MAX_FIGURES = 10  # model figures per run (besides the final model's): each costs 0.1-0.5 s to draw


def run_length(steps_per_epoch: int, trainer: TrainerConfig) -> int:
    """Optimizer steps in the run: ``max_epochs`` epochs, or ``max_steps`` if that comes sooner."""
    total = steps_per_epoch * trainer.max_epochs
    return total if trainer.max_steps is None else min(total, trainer.max_steps)


@dataclass(frozen=True)
class Cadence:
    """The schedule of a run's events, by optimizer step (1-based: step ``s`` is the ``s``-th step taken)."""

    total_steps: int
    steps_per_epoch: int
    log_every: int
    eval_every: int = 0  # 0: at epoch ends, no more often than every log_every steps
    checkpoint_every: int = 0  # 0: only at the end (and on a stop signal)
    signal_check_every: int = 0  # 0: only at logging steps

    @classmethod
    def of(cls, config: Config, steps_per_epoch: int) -> Cadence:
        """The cadence ``config`` asks for, over ``steps_per_epoch`` steps an epoch."""
        trainer = config.trainer
        return cls(
            total_steps=run_length(steps_per_epoch, trainer),
            steps_per_epoch=steps_per_epoch,
            log_every=trainer.log_every,
            eval_every=trainer.eval_every,
            checkpoint_every=config.checkpoint.every_n_steps,
            signal_check_every=config.checkpoint.signal_check_every,
        )

    def is_last(self, step: int) -> bool:
        return step == self.total_steps

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` completes an epoch: per-epoch schedules step, the next epoch's order is drawn."""
        return step % self.steps_per_epoch == 0

    def step_in_epoch(self, step: int, epoch: int) -> int:
        """Steps of ``epoch`` already taken once ``step`` steps are done (where a resumed epoch continues)."""
        return step - epoch * self.steps_per_epoch

    def checkpoints(self, step: int) -> bool:
        """Save after ``step``: every ``checkpoint_every`` steps, and after the last."""
        every = self.checkpoint_every
        return self.is_last(step) or bool(every and step % every == 0)

    def logs(self, step: int) -> bool:
        """Reduce and log the metrics after ``step`` (the loop's only host syncs): every ``log_every`` steps,
        the last step, and checkpoint steps (their divergence check keeps a non-finite state out of a
        checkpoint)."""
        return step % self.log_every == 0 or self.checkpoints(step)

    def evaluates(self, step: int, evaluated_at: int) -> bool:
        """Evaluate after ``step``, the last evaluation having been after ``evaluated_at`` (-1: none yet).

        Every ``eval_every`` steps when that is set; otherwise at epoch ends, but no more often than every
        ``log_every`` steps (with one step an epoch, evaluating each epoch would sync each step). Always
        after the last step: the final model's metrics belong in the results and the final checkpoint.
        """
        if step == evaluated_at:
            return False
        if self.is_last(step):
            return True
        if self.eval_every:
            return step % self.eval_every == 0
        return self.ends_epoch(step) and step - max(evaluated_at, 0) >= self.log_every

    def checks_signals(self, step: int) -> bool:
        """Whether the ranks start their own agreement on a stop signal after ``step``.

        Logging steps carry the signal flag in the metrics' all-reduce for free; this own, asynchronous
        check only bounds the wait when logging steps are far apart.
        """
        every = self.signal_check_every
        return bool(every) and step % every == 0 and not self.logs(step)

    def figure_spacing(self) -> int:
        """Steps between the model's figures: at evaluations, at most about :data:`MAX_FIGURES` a run."""
        return max(1, self.total_steps // MAX_FIGURES)

    def draws_figures(self, step: int, figured_at: int | None) -> bool:
        """Draw the model's figures at this evaluation (the last drawing was after ``figured_at``)."""
        return figured_at is None or step - figured_at >= self.figure_spacing() or self.is_last(step)
