"""The training state a checkpoint holds, and how the trainer saves and restores it.

A resumed run must continue bit for bit where the saved one stood, so the state is everything the
next step depends on: weights, optimizer and schedule state, the step, epoch and position inside it
(the data order is a function of the seed and the epoch), every rank's random generators, and the
loss accumulated since the last logging step. Saving is collective: every rank hands its generators
to rank 0, rank 0 writes, and every rank learns whether the write worked.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from dtrain import checkpoint
from dtrain.checkpoint import CheckpointError, Found
from dtrain.config import CheckpointConfig, OptimConfig
from dtrain.dist import DistEnv, broadcast_str, current_op, first_error, gather_to_main

log = logging.getLogger("dtrain")


@dataclass
class Progress:
    """Where training stands, besides the model, the optimizer and the schedule."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step belongs to
    evaluated_at: int = -1  # the step of the last evaluation
    steps_since_log: int = 0  # steps since the last logging step
    losses_since_log: int = 0  # of those, the steps whose loss is in the loss sum (skipped steps are not)
    skipped_in_a_row: int = 0  # trainer.on_nonfinite=skip: consecutive skipped steps
    skipped_steps: int = 0  # all skipped steps
    train_seconds: float = 0.0  # time spent training (evaluation left out), over every attempt
    wall_seconds: float = 0.0  # time in fit(), over every attempt
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged value of each tag
    best_value: float | None = None  # objective.metric's best value at an evaluation (checkpoint.save_best)
    best_step: int = -1  # and its step
    stop_best: float | None = None  # early stopping: the value the next evaluation must beat by min_delta
    evals_without_improvement: int = 0  # early stopping: evaluations since it last did
    stopped_early: bool = False  # early stopping ended the run: a resumed copy trains no further
    watched: str = ""  # what the four above watch, "metric:mode"; another objective on resume starts them over


@dataclass(frozen=True)
class Resumed:
    """A checkpoint loaded for resuming, and the config keys the user allowed to change."""

    found: Found
    state: dict[str, Any]
    changes: list[str]

    @property
    def step(self) -> int:
        return int(self.state["progress"]["step"])


def prepare_resume(
    resume: str, run_dir: Path, cfg: CheckpointConfig, config: dict[str, Any], env: DistEnv
) -> Resumed | None:
    """The checkpoint to resume from, loaded and matched against ``config``; None to start fresh.

    Rank 0 picks the file and every rank loads that one, so they agree even while files change. An error
    on any rank (no such file, a corrupt one, a config that does not match) is raised on every rank.
    Raises :class:`CheckpointError` for a run directory that ``resume=never`` must not overwrite.
    """
    chosen, error = "", ""
    if env.is_main:
        try:
            found = checkpoint.find(resume, run_dir)
            if resume == "never" and checkpoint.has_checkpoints(run_dir) and not cfg.overwrite:
                raise CheckpointError(
                    f"resume=never but {run_dir / checkpoint.DIR_NAME} holds checkpoints of an earlier run; "
                    f"resume=auto continues it, checkpoint.overwrite=true deletes them and starts over"
                )
            chosen = "" if found is None else str(found.path)
        except CheckpointError as exc:
            error = str(exc)
    if error := first_error(error, env):
        raise CheckpointError(error)
    chosen = broadcast_str(chosen, env)
    if not chosen:
        return None
    resumed: Resumed | None = None
    try:
        found = checkpoint.find(chosen, run_dir)
        assert found is not None
        state = checkpoint.load(found)
        changes = checkpoint.config_changes(
            state["config"], config, int(state["world_size"]), env.world_size, cfg.allow_changes, found.path
        )
        resumed = Resumed(found, state, changes)
    except CheckpointError as exc:
        error = str(exc)
    if error := first_error(error, env):
        raise CheckpointError(error)
    return resumed


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state)``, strictly, with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}")
    for name, tensor in own.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: {name} has shape {list(state[name].shape)} there, "
                f"{list(tensor.shape)} here"
            )
    model.load_state_dict(state)


class Checkpointer:
    """Saves the full state when the loop asks (the cadence says when); restores a :class:`Resumed`."""

    def __init__(
        self,
        run_dir: Path,
        cfg: CheckpointConfig,
        env: DistEnv,
        config: dict[str, Any],
        resumed: Resumed | None = None,
    ) -> None:
        self.directory = run_dir / checkpoint.DIR_NAME
        self.cfg = cfg
        self.env = env
        self.config = config
        self.resumed = resumed
        self.saved_at = resumed.step if resumed else -1

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        progress: Progress,
        sums: dict[str, torch.Tensor],
        data_order: dict[str, int],
    ) -> None:
        """Save the state after ``progress.step`` (a collective: call it on every rank)."""
        step, env = progress.step, self.env
        if self.saved_at == step:
            return
        current_op("checkpoint: gathering every rank's random generators", step)
        rngs = gather_to_main(checkpoint.rng_state(env.device), env)
        error = ""
        if env.is_main:
            state = {
                "format": checkpoint.FORMAT,
                "config": self.config,
                "world_size": env.world_size,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": dataclasses.asdict(progress),
                "sums": {name: t.detach().cpu() for name, t in sums.items()},  # accumulated since the last log
                "rng": rngs,
                "data_order": data_order,
                "grad_scaler": None,  # dtrain trains in float32/float64 or bf16 autocast: nothing to scale
            }
            manifest = {"config_hash": checkpoint.config_hash(self.config), "world_size": env.world_size}
            fingerprint = self.config.get("data", {}).get("fingerprint")  # the data files (data.fingerprint)
            if fingerprint:
                manifest["data_fingerprint"] = fingerprint
            try:
                path = checkpoint.save(self.directory, state, step, self.cfg.keep_last, manifest)
                log.info("checkpoint: %s", path)
            except OSError as exc:
                error = f"cannot write a checkpoint in {self.directory}: {exc.strerror or exc}"
        if env.distributed:  # every rank learns whether rank 0's write worked (and waits for it)
            current_op("checkpoint: waiting for rank 0 to write it", step)
            box = [error]
            torch_dist.broadcast_object_list(box, src=0, group=env.checkpoint_group)
            error = box[0]
        if error:
            raise CheckpointError(f"{error}; the previous checkpoint is intact")
        self.saved_at = step

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        optim_cfg: OptimConfig,
        sums: dict[str, torch.Tensor],
    ) -> Progress:
        """Load the resumed state into the freshly built objects; return the progress to continue from."""
        assert self.resumed is not None
        state, changes, env = self.resumed.state, self.resumed.changes, self.env
        load_model_state(model, state["model"], self.resumed.found.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_optim_changes(optimizer, scheduler, optim_cfg, changes)
        rngs = state["rng"]
        if env.rank < len(rngs):
            checkpoint.set_rng_state(rngs[env.rank], env.device)
        # else: a rank the saved run did not have (checkpoint.allow_changes=[world_size]) keeps its fresh seed
        for name, tensor in sums.items():
            tensor.copy_(state["sums"][name])
        progress = Progress(**state["progress"])
        note = f" (changed: {', '.join(changes)})" if changes else ""
        log.info("resumed from %s at step %d%s", self.resumed.found.path, progress.step, note)
        return progress


def _apply_optim_changes(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: OptimConfig,
    changes: list[str],
) -> None:
    """Put the allowed new optimizer settings over the checkpoint's (which ``load_state_dict`` restored)."""
    keys = {c.split(".", 1)[1] for c in changes if c.startswith("optim.")}
    if "lr" in keys:
        # The schedule multiplies the base rate: the new base, at the schedule's current position.
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    for key in keys - {"lr"}:
        for group in optimizer.param_groups:
            if key in group:
                group[key] = tuple(optimizer.defaults[key]) if key == "betas" else optimizer.defaults[key]
