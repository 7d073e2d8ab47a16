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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
from torch import nn

from dtrain import checkpoint
from dtrain.checkpoint import CheckpointError, Found
from dtrain.config import CheckpointConfig, OptimConfig
from dtrain.dist import DistEnv, broadcast_str, current_op, first_error, gather_to_main
from dtrain.errors import first_line

if TYPE_CHECKING:
    from dtrain.train.strategy import Strategy

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
        state = checkpoint.load(found, verify_shards=env.is_main)  # one rank reads every shard to check it
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
    own = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    check_weights_fit(own, {name: list(tensor.shape) for name, tensor in state.items()}, path)
    model.load_state_dict(state)


def check_weights_fit(own: dict[str, list[int]], saved: dict[str, list[int]], path: Path) -> None:
    """One line naming the first weight that the checkpoint at ``path`` lacks, has in excess, or holds in another
    (whole) shape than the model: ``own`` and ``saved`` map names to shapes."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}")
    for name, shape in own.items():
        if shape != saved[name]:
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: {name} has shape {saved[name]} there, {shape} here"
            )


class Checkpointer:
    """Saves the full state when the loop asks (the cadence says when); restores a :class:`Resumed`.

    Under DDP rank 0 writes one file, with every rank's generators gathered to it. Under a sharded
    strategy every rank writes its own shards of the weights and the optimizer state, and its own
    generators and loss sums under its own key (``rank<N>.*``: torch.distributed.checkpoint keeps one copy
    of tensors that share a name); rank 0 adds what every rank holds alike (:mod:`dtrain.checkpoint`).
    ``model_record`` is what rebuilding the model needs (:func:`dtrain.model_file.model_record`), kept in
    every checkpoint so that ``dtrain.load`` and ``dtrain predict`` can read one.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: CheckpointConfig,
        env: DistEnv,
        config: dict[str, Any],
        resumed: Resumed | None = None,
        model_record: dict[str, Any] | None = None,
    ) -> None:
        self.directory = run_dir / checkpoint.DIR_NAME
        self.cfg = cfg
        self.env = env
        self.config = config
        self.resumed = resumed
        self.model_record = model_record
        self.saved_at = resumed.step if resumed else -1

    def save(
        self,
        strategy: Strategy,
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
        common = {
            "format": checkpoint.FORMAT,
            "config": self.config,
            "world_size": env.world_size,
            "scheduler": scheduler.state_dict(),
            "progress": dataclasses.asdict(progress),
            "data_order": data_order,
            "model_record": self.model_record,  # for dtrain.load and dtrain predict
            "grad_scaler": None,  # dtrain trains in float32/float64 or bf16 autocast: nothing to scale
        }
        manifest = {"config_hash": checkpoint.config_hash(self.config), "world_size": env.world_size}
        fingerprint = self.config.get("data", {}).get("fingerprint")  # the data files (data.fingerprint)
        if fingerprint:
            manifest["data_fingerprint"] = fingerprint
        if strategy.sharded:
            error = self._save_sharded(strategy, optimizer, sums, common, manifest, step)
        else:
            error = self._save_file(strategy.model, optimizer, sums, common, manifest, step)
        if env.distributed:  # every rank learns whether rank 0's write worked (and waits for it)
            current_op("checkpoint: waiting for rank 0 to write it", step)
            box = [error]
            torch_dist.broadcast_object_list(box, src=0, group=env.checkpoint_group)
            error = box[0]
        if error:
            raise CheckpointError(f"{error}; the previous checkpoint is intact")
        self.saved_at = step

    def _save_file(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sums: dict[str, torch.Tensor],
        common: dict[str, Any],
        manifest: dict[str, Any],
        step: int,
    ) -> str:
        """One file by rank 0, with every rank's generators gathered to it; rank 0's error, if any."""
        env = self.env
        current_op("checkpoint: gathering every rank's random generators and loss sums", step)
        own_sums = {name: t.detach().cpu() for name, t in sums.items()}  # this rank's, since the last log
        gathered = gather_to_main((checkpoint.rng_state(env.device), own_sums), env)
        if gathered is None:
            return ""
        state = common | {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "sums": own_sums,  # rank 0's (what checkpoints before rank_sums held)
            "rank_sums": [rank_sums for _, rank_sums in gathered],
            "rng": [rng for rng, _ in gathered],
        }
        try:
            path = checkpoint.save(self.directory, state, step, self.cfg.keep_last, manifest)
            log.info("checkpoint: %s", path)
        except OSError as exc:
            return f"cannot write a checkpoint in {self.directory}: {exc.strerror or exc}"
        return ""

    def _save_sharded(
        self,
        strategy: Strategy,
        optimizer: torch.optim.Optimizer,
        sums: dict[str, torch.Tensor],
        common: dict[str, Any],
        manifest: dict[str, Any],
        step: int,
    ) -> str:
        """Every rank its shards into a partial directory, then rank 0 the rest and the rename; rank 0's error."""
        env = self.env
        current_op("checkpoint: preparing its directory", step)
        error = ""
        partial = checkpoint.partial_path(self.directory, step)
        if env.is_main:
            try:
                checkpoint.start_sharded(self.directory, step)
            except OSError as exc:
                error = f"cannot write a checkpoint in {self.directory}: {exc.strerror or exc}"
        if error := first_error(error, env):
            return error
        model_state, optim_state = strategy.sharded_state(optimizer)  # type: ignore[attr-defined]
        optim_tensors, optim_rest = split_optimizer_state(optim_state)
        own = {"rng": checkpoint.rng_tensors(env.device), "sums": {k: t.detach() for k, t in sums.items()}}
        current_op("checkpoint: writing every rank's shards", step)
        try:
            shards = {"model": model_state, "optimizer": optim_tensors, f"rank{env.rank}": own}
            checkpoint.write_shards(partial, shards, env.checkpoint_group)
        except Exception as exc:  # an OSError on any rank reaches every rank as DCP's CheckpointException
            error = f"cannot write a checkpoint in {self.directory}: {first_line(exc)}"
        if error := first_error(error, env):
            return error
        # Each rank hashes the files it wrote (every rank reads only its own), and rank 0 collects the digests.
        try:
            digests, error = checkpoint.shard_digests(partial, env.rank), ""
        except OSError as exc:
            digests, error = {}, f"cannot read back a checkpoint shard in {partial}: {exc.strerror or exc}"
        current_op("checkpoint: gathering the shards' digests", step)
        gathered = gather_to_main((digests, error), env)
        if gathered is None:
            return ""
        if error := next((f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e), ""):
            return error
        state = common | {"optimizer": optim_rest}
        files = {name: digest for rank_digests, _ in gathered for name, digest in rank_digests.items()}
        try:
            path = checkpoint.finish_sharded(partial, state, step, self.cfg.keep_last, manifest, files)
            log.info("checkpoint: %s (sharded, %d ranks)", path, env.world_size)
        except (OSError, CheckpointError) as exc:
            return f"cannot write a checkpoint in {self.directory}: {getattr(exc, 'strerror', None) or exc}"
        return ""

    def restore(
        self,
        strategy: Strategy,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        optim_cfg: OptimConfig,
        sums: dict[str, torch.Tensor],
    ) -> Progress:
        """Load the resumed state into the freshly built objects; return the progress to continue from."""
        assert self.resumed is not None
        state, changes, env = self.resumed.state, self.resumed.changes, self.env
        if "sharded" in state:
            own = self._restore_shards(strategy, optimizer, Path(state["sharded"]), state["optimizer"])
            if own is not None:
                checkpoint.set_rng_tensors(own["rng"], env.device)
                for name, tensor in sums.items():
                    tensor.copy_(own["sums"][name])
            # else: a rank the saved run did not have (checkpoint.allow_changes=[world_size]): fresh seed, no sums
        else:
            load_model_state(strategy.model, state["model"], self.resumed.found.path)
            optimizer.load_state_dict(state["optimizer"])
            rngs, rank_sums = state["rng"], state.get("rank_sums", [])
            if env.rank < len(rngs):
                checkpoint.set_rng_state(rngs[env.rank], env.device)
            # A checkpoint saved mid-way through a logging window (a stop signal) holds each rank's loss sum.
            if env.rank < len(rank_sums):
                own_sums = rank_sums[env.rank]
            else:  # a rank the saved run did not have took no step since the last log; before rank_sums: rank 0's
                own_sums = {k: torch.zeros_like(v) for k, v in state["sums"].items()} if rank_sums else state["sums"]
            for name, tensor in sums.items():
                tensor.copy_(own_sums[name])
        scheduler.load_state_dict(state["scheduler"])
        _apply_optim_changes(optimizer, scheduler, optim_cfg, changes)
        progress = Progress(**state["progress"])
        note = f" (changed: {', '.join(changes)})" if changes else ""
        log.info("resumed from %s at step %d%s", self.resumed.found.path, progress.step, note)
        return progress

    def _restore_shards(
        self, strategy: Strategy, optimizer: torch.optim.Optimizer, path: Path, optim_rest: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Read a sharded checkpoint into the model and the optimizer (resharded to this world size); return this
        rank's own saved state (generators, loss sums), or None where the saved run had no such rank."""
        env = self.env
        model_state, optim_state = strategy.sharded_state(optimizer)  # type: ignore[attr-defined]
        optim_tensors, _ = split_optimizer_state(optim_state)
        own_key = f"rank{env.rank}"
        error, mine = "", {}
        try:  # before the collective read: a rank that cannot go on says so, and every rank stops with it
            saved = checkpoint.shard_names(path)
            own_shapes = {name: list(tensor.shape) for name, tensor in model_state.items()}  # a DTensor's: whole
            saved_shapes = {n.removeprefix("model."): size for n, (size, _) in saved.items() if n.startswith("model.")}
            check_weights_fit(own_shapes, saved_shapes, path)
            mine = {
                n: torch.empty(size, dtype=dtype) for n, (size, dtype) in saved.items() if n.startswith(f"{own_key}.")
            }
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # an unreadable .metadata
            error = f"checkpoint {path} is unreadable: {first_line(exc)}"
        if error := first_error(error, env):
            raise CheckpointError(error)
        wanted: dict[str, Any] = {"model": model_state, "optimizer": optim_tensors}
        if mine:
            wanted |= mine  # flat names, as saved: rank<N>.rng.torch, rank<N>.sums.loss, ...
        current_op("checkpoint: reading the shards")
        try:  # DCP gathers every rank's read errors and raises them on every rank
            checkpoint.read_shards(path, wanted, env.checkpoint_group)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read into this run: {first_line(exc)}") from None
        strategy.load_sharded_state(optimizer, model_state, join_optimizer_state(optim_tensors, optim_rest))  # type: ignore[attr-defined]
        if not mine:
            return None
        own: dict[str, dict[str, torch.Tensor]] = {"rng": {}, "sums": {}}
        for name, tensor in mine.items():
            part, key = name[len(own_key) + 1 :].split(".", 1)
            own[part][key] = tensor
        return own


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state dict by parameter name split into its tensors (per-parameter state, saved as shards)
    and the rest (param groups, and state that is not a tensor), which rank 0 keeps in ``trainer.pt``: the
    shards then hold tensors only, and a checkpoint loads without unpickling anything."""
    entries = state["state"].items()
    tensors = {name: {k: v for k, v in entry.items() if torch.is_tensor(v)} for name, entry in entries}
    others = {name: {k: v for k, v in entry.items() if not torch.is_tensor(v)} for name, entry in entries}
    return tensors, {"state": others, "param_groups": state["param_groups"]}


def join_optimizer_state(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_optimizer_state`."""
    names = set(tensors) | set(rest["state"])
    state = {name: {**rest["state"].get(name, {}), **tensors.get(name, {})} for name in names}
    return {"state": state, "param_groups": rest["param_groups"]}


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
