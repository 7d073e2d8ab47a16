"""The training loop: forward and backward, step, schedule; then whatever the cadence says is due.

:meth:`Trainer.fit` reads top to bottom. Its parts decide the rest: the strategy (:mod:`.strategy`)
makes the gradients and synchronises them, whatever the model and however many processes; the cadence
(:mod:`.cadence`) says when to log, evaluate, checkpoint and check for stop signals; the non-finite
policy (:mod:`.nonfinite`) skips or stops; the log window (:mod:`.log_window`) holds the loss between
logging steps and packs what is logged; the stopwatch (:mod:`.stopwatch`) keeps evaluation and
checkpoints out of the throughput. The trainer never asks which model or data set it trains.
Host syncs happen only at logging and evaluation steps (and every step under ``on_nonfinite=skip``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dtrain.config import Config
from dtrain.data.dataset import DataSet
from dtrain.data.loader import BatchPlan
from dtrain.dist import DistEnv, current_op
from dtrain.faults import Faults
from dtrain.optim import build_optimizer, build_scheduler, schedule_length, schedule_moves
from dtrain.preemption import Preemption
from dtrain.train.cadence import Cadence
from dtrain.train.evaluation import draw_figures, evaluate
from dtrain.train.log_window import LogWindow
from dtrain.train.logger import RunLogger
from dtrain.train.metrics import ValMetrics
from dtrain.train.monitor import StepMonitor, custom_scalars_layout
from dtrain.train.nonfinite import NonFinitePolicy, StopTraining
from dtrain.train.objective import Loss
from dtrain.train.state import Checkpointer, Progress
from dtrain.train.stopwatch import Stopwatch
from dtrain.train.strategy import build_device, build_strategy, param_dtype
from dtrain.train.watch import ObjectiveWatch

log = logging.getLogger("dtrain")

# Keeps the best model: called on every rank with the whole weights (rank 0's; None on the others), the step and
# the validation metrics.
SaveBest = Callable[[dict[str, torch.Tensor] | None, int, dict[str, float]], None]


@dataclass
class TrainResult:
    """How :meth:`Trainer.fit` ended."""

    status: str  # completed | diverged | preempted
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged value of each tag
    samples_per_sec: float = 0.0  # over training time only (evaluation and checkpoints left out)
    wall_time_s: float = 0.0
    message: str = ""  # why it stopped early, one line


class Trainer:
    """Trains one model on one in-memory data set, as ``config`` says; built on every rank alike.

    ``loss`` and ``metrics`` are what it optimises and measures; ``save_best`` (with ``checkpoint.save_best``)
    writes the best model when an evaluation improves on it.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSet,
        batches: BatchPlan,
        config: Config,
        env: DistEnv,
        logger: RunLogger,
        checkpointer: Checkpointer,
        faults: Faults,
        preemption: Preemption,
        loss: Loss,
        metrics: ValMetrics,
        save_best: SaveBest | None = None,
    ) -> None:
        trainer, optim, schedule = config.trainer, config.optim, config.schedule
        self.model = model.to(build_device(trainer, env), param_dtype(trainer.precision))
        self.data, self.batches, self.env, self.logger = data, batches, env, logger
        self.checkpointer, self.faults, self.preemption = checkpointer, faults, preemption
        self.loss, self.metrics = loss, metrics.to(env.device, param_dtype(trainer.precision))
        self.watch, self.save_best = ObjectiveWatch(config), save_best
        self.strategy = build_strategy(self.model, env, trainer, loss.fn)
        # After the strategy: sharding replaces the parameters, and the optimizer must hold the new ones.
        named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named_params]
        sum_shards = self.strategy.sum_shards if self.strategy.sharded else None
        # A sharded model's forward is a collective: every rank runs the figures' predictions, rank 0 logs them.
        self.draws_figures = trainer.figures and (env.is_main or self.strategy.sharded)
        self.cadence = Cadence.of(config, batches.steps_per_epoch)
        self.optimizer = build_optimizer(params, optim)
        length = schedule_length(schedule, self.cadence.total_steps, batches.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, schedule, length)
        moves = schedule_moves(schedule)  # a constant rate without warmup: its scheduler is never stepped
        self.lr_each_step = moves and schedule.interval != "epoch"
        self.lr_each_epoch = moves and schedule.interval == "epoch"
        self.monitor = StepMonitor(
            named_params,
            trainer.clip_grad_value,
            trainer.clip_grad_norm,
            trainer.histogram_every,
            logger,
            env.device,
            sum_shards,
        )
        logger.custom_scalars(custom_scalars_layout(self.monitor, bool(data.val), env.device.type == "cuda"))
        self.nonfinite = NonFinitePolicy(trainer, optim, params, env)
        self.window = LogWindow(self.monitor, env, batches.global_batch, param_dtype(trainer.precision))
        self.progress = Progress()
        if checkpointer.resumed is not None:
            self.progress = checkpointer.restore(self.strategy, self.optimizer, self.scheduler, optim, self.window.sums)
        self.watch.adopt(self.progress)
        self.stopwatch = Stopwatch(self.progress.train_seconds, self.progress.wall_seconds)
        self.figured_at: int | None = None

    def fit(self) -> TrainResult:
        """Train until the last step, a divergence or an agreed stop signal; ``self.model`` holds the weights.

        A resumed run (``checkpointer.resumed``) continues exactly where its checkpoint stood.
        """
        progress, cadence, optimizer, faults = self.progress, self.cadence, self.optimizer, self.faults
        status, message = "completed", ""
        self.model.train()
        self.stopwatch.start()
        epoch_batches = None
        try:
            while progress.step < cadence.total_steps and not progress.stopped_early:
                if epoch_batches is None:
                    resume_at = cadence.step_in_epoch(progress.step, progress.epoch)
                    epoch_batches = iter(self.batches.epoch(progress.epoch, start_step=resume_at))
                step = progress.step + 1  # the step being taken (1-based): what logs and checkpoints call it
                loss_scale = faults.loss_scale(step) if faults.armed else 1.0
                step_loss = self.strategy.forward_backward(next(epoch_batches), step, loss_scale)
                progress.step, log_now = step, cadence.logs(step)
                progress.steps_since_log += 1
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses: what is logged
                skipped = self.nonfinite.skip(step_loss, step, progress)
                if not skipped:
                    self.window.add(step_loss, progress)
                    # Norms before clipping (at logging steps), then clipping.
                    if log_now or not self.monitor.idle:
                        self.monitor.clip(step, log_now)
                    optimizer.step()
                    if self.lr_each_step:
                        self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                if log_now:
                    self.log_metrics(step, lr, skipped)
                if cadence.ends_epoch(step):
                    if self.lr_each_epoch:
                        self.scheduler.step()
                    progress.epoch += 1
                    epoch_batches = None
                # A step boundary: everything of this step is done, so a checkpoint here resumes exactly.
                if cadence.evaluates(step, progress.evaluated_at):
                    self.evaluate()
                if cadence.checkpoints(step) or progress.stopped_early:
                    self.save_checkpoint()
                if progress.stopped_early:
                    message = self.watch.stop_message(progress)
                    log.info("%s", message)
                    break
                if self.preemption.agreed(step, cadence.checks_signals(step)):
                    self.save_checkpoint()
                    raise StopTraining("preempted", self.preempted_message(step))
                if faults.armed:
                    faults.after_step(step, lambda: self.preemption.received is not None)
        except StopTraining as stop:
            status, message = stop.status, stop.message
        finally:
            self.batches.close()  # a DataLoader's workers end with training, not when the loader is collected
        if status == "completed" and progress.evaluated_at != progress.step:
            self.evaluate()  # resumed from a checkpoint saved before the end's evaluation existed
        self.preemption.finish()
        train_s = self.stopwatch.train_s()
        return TrainResult(
            status=status,
            steps=progress.step,
            metrics=progress.metrics,
            samples_per_sec=progress.step * self.batches.global_batch / max(train_s, 1e-9),
            wall_time_s=self.stopwatch.wall_s(),
            message=message,
        )

    def log_metrics(self, step: int, lr: float, skipped: bool) -> None:
        """Reduce, log and look at the steps since the last logging step (raises StopTraining on divergence)."""
        progress = self.progress
        flag = [self.preemption.flag()]
        values, (signals,) = self.window.close(step, lr, skipped, progress, self.stopwatch, riders=flag)
        self.preemption.observe(signals)
        self.logger.scalars(step, values)
        self.logger.progress_update(step, self.cadence.total_steps, progress.epoch + 1, values)
        progress.metrics.update(values)
        self.nonfinite.check_logged(step - progress.steps_since_log, step, values)
        self.window.reset(progress)

    def evaluate(self) -> None:
        """Validation metrics (every rank), and the model's figures when due (rank 0), set aside from training."""
        step, data = self.progress.step, self.data
        with self.stopwatch.aside():  # evaluation ends in a host sync: this is its real cost
            current_op("evaluation metrics all-reduce", step)
            chunk = self.batches.micro_batch
            predict, lockstep = self.strategy.predict, self.strategy.sharded
            val = evaluate(self.model, predict, data.val, self.loss, self.metrics, self.env, chunk, lockstep)
            self.logger.scalars(step, val)
            self.progress.metrics.update(val)
            self.progress.evaluated_at = step
            # Every rank sees the same reduced metrics, so every rank enters the (sharded) gathering alike.
            if self.watch.active and self.watch.observe(self.progress, val) and self.save_best is not None:
                self.save_best(self.strategy.full_state(), step, val)
            if self.draws_figures and self.cadence.draws_figures(step, self.figured_at):
                images = draw_figures(self.model, data, self.env.device, chunk, self.loss)
                if self.env.is_main:
                    self.logger.images(step, images)
                self.figured_at = step

    def save_checkpoint(self) -> None:
        """Save the full training state after the current step (a collective), set aside from training."""
        progress = self.progress
        with self.stopwatch.aside():
            progress.wall_seconds, progress.train_seconds = self.stopwatch.wall_s(), self.stopwatch.train_s()
            self.logger.flush()  # the curves up to this checkpoint are on disk before it is
            in_epoch = self.cadence.step_in_epoch(progress.step, progress.epoch)
            data_order = {"seed": self.batches.seed, "epoch": progress.epoch, "step_in_epoch": in_epoch}
            sums = self.window.sums
            self.checkpointer.save(self.strategy, self.optimizer, self.scheduler, progress, sums, data_order)

    def preempted_message(self, step: int) -> str:
        return (
            f"stopped by {self.preemption.signal_name} after step {step}: checkpoint saved in "
            f"{self.checkpointer.directory}; launch the same command (same run directory) to resume"
        )
