"""A population run, assembled: members -> data -> stacked model -> loop -> leaderboard.

Under torchrun the members are split across the ranks (contiguous shares, as the data is split in an
ordinary run); each rank trains its share on the full data, with no gradient all-reduce between
members. At logging steps the ranks' values are gathered to rank 0, which alone writes: the
population's own TensorBoard run (best and median loss, members still training), one TensorBoard
run per member under ``members/`` (with HParams: its values and final metrics), the leaderboard,
the best member's preset and ``metrics.json`` (the best member's metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from dtrain import dist
from dtrain.atomic import write_atomic
from dtrain.config import Config, ConfigError
from dtrain.data import ShardedBatches, shard_bounds
from dtrain.data.dataset import DataSet, require_in_memory
from dtrain.data.registry import build_training_data
from dtrain.data.summary import data_summary, source_of
from dtrain.graph import builders
from dtrain.models import build_initial_model, gradient_source, model_sizes
from dtrain.population import leaderboard
from dtrain.population.chunking import pick_chunk
from dtrain.population.members import Member, describe, expand_members, varied_specs
from dtrain.population.stacked import StackedGraphModel, StackedModel, StackedTorchModel
from dtrain.population.train import fit_population
from dtrain.results import PopulationFit, RunResult, hparam_metrics, metrics_json, objective_metric
from dtrain.run_dir import open_run_dir
from dtrain.train.cadence import Cadence
from dtrain.train.logger import RunLogger
from dtrain.train.metrics import default_metrics
from dtrain.train.objective import Loss, build_loss, check_fit, check_objective
from dtrain.train.strategy import param_dtype

log = logging.getLogger("dtrain")
OPTIMIZERS = ("sgd", "adam", "adamw")


def is_population(config: Config) -> bool:
    """A population run: more than one member, or any per-member values given."""
    pop = config.population
    return pop.size > 1 or pop.grid or bool(varied_specs(config))


def check_population(config: Config, world_size: int, members: list[Member]) -> None:
    """What a population cannot do, as one line each."""
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim={config.optim.name}: a population trains with {', '.join(OPTIMIZERS)}")
    if config.trainer.precision == "bf16-mixed":
        raise ConfigError("trainer.precision=bf16-mixed: a population trains in float32 or float64")
    if config.trainer.compile:
        raise ConfigError("trainer.compile=true does not apply to a population (vmap over members)")
    if config.fault.kind != "none":
        raise ConfigError("fault.kind: fault injection is for single runs, not populations")
    if config.trainer.on_nonfinite != "stop":
        raise ConfigError(
            f"trainer.on_nonfinite={config.trainer.on_nonfinite}: a population freezes a member that goes "
            "non-finite; use the default, stop"
        )
    if len(members) < world_size:
        raise ConfigError(f"population of {len(members)} members on {world_size} ranks: give at least one per rank")
    if config.population.chunk < 0:
        raise ConfigError(f"population.chunk={config.population.chunk} must be 0 (measured) or a member count")


def build_stacked(
    members: list[Member], data: DataSet, device: torch.device, dtype: torch.dtype, loss: Loss | None = None
) -> StackedModel:
    """The members' models, initialised each as its own single run would be, stacked along the member axis.

    Raises :class:`ConfigError` for a model with buffers (BatchNorm's running statistics): ``torch.func`` stacks
    parameters, and one shared buffer updated by every member would be no member's own."""
    loss = loss or build_loss(members[0].config.loss, data.task, data.num_classes)
    singles: dict[int | None, torch.nn.Module] = {}
    models = []
    for member in members:
        seed = member.config.init_seed
        if seed not in singles:  # members that share a seed share initial weights: build once
            singles[seed] = build_initial_model(member.config, data).to(device, dtype)
        models.append(singles[seed])
    check_fit(models[0], loss, data, model_sizes(members[0].config, data))  # the user's model and loss, once
    buffers = [name for name, _ in models[0].named_buffers()]
    if buffers:
        raise ConfigError(
            f"population.size>1 cannot stack this model: it has buffers ({', '.join(buffers[:3])}), such as "
            "BatchNorm's running statistics, which torch.func cannot keep per member; train its members as "
            "separate runs (a sweep, python -m dtrain -m ...) or use a model without them (LayerNorm keeps none)"
        )
    if gradient_source(models[0]) == "autograd":
        return StackedTorchModel(models, loss)
    # The engine's members: their graphs rebuilt over member-stacked parameter tensors.
    names = [node.name for node in models[0].built.parameters]
    params = [torch.stack([m.built.parameters[k].tensor.detach() for m in models]) for k in range(len(names))]
    cfg = members[0].config.model
    if cfg.graph == "polynomial":

        def build(tensors: list[torch.Tensor]) -> builders.Built:
            return builders.polynomial(tensors, data.num_inputs, cfg.degree)
    else:

        def build(tensors: list[torch.Tensor]) -> builders.Built:
            pairs = list(zip(tensors[0::2], tensors[1::2], strict=True))
            return builders.mlp(pairs, cfg.activation, data.task)

    return StackedGraphModel(names, params, build, loss)


class PopulationLogger:
    """Rank 0's TensorBoard output: the population's run in the run directory, one run per member below it."""

    def __init__(self, run_dir: Path, members: list[Member], enabled: bool, progress: str) -> None:
        self.summary = RunLogger(run_dir, enabled, progress)
        self.members = [
            RunLogger(run_dir / "members" / leaderboard.member_name(m.index, len(members)), enabled, "off")
            for m in members
        ]

    def scalars(self, step: int, values: dict[str, list[float]]) -> None:
        for member, logger in enumerate(self.members):
            logger.scalars(step, {tag: v[member] for tag, v in values.items() if math.isfinite(v[member])})
        losses = [v for v in values.get("train/loss", []) if math.isfinite(v)]
        summary: dict[str, float] = {}
        if losses:
            summary = {
                "population/best_train_loss": min(losses),
                "population/median_train_loss": statistics.median(losses),
                "population/training_members": float(len(losses)),
            }
        val = [v for v in values.get("val/loss", []) if math.isfinite(v)]
        if val:
            summary["population/best_val_loss"] = min(val)
        if "perf/samples_per_sec" in values:
            summary["perf/member_samples_per_sec"] = sum(values["perf/samples_per_sec"])
        self.summary.scalars(step, summary)
        if losses and self.summary.progress != "off":
            log.info(
                "step %d: best train/loss %.5g, median %.5g, %d of %d members training",
                step,
                summary["population/best_train_loss"],
                summary["population/median_train_loss"],
                len(losses),
                len(self.members),
            )

    def close(self) -> None:
        self.summary.close()
        for logger in self.members:
            logger.close()


def _gather(values: dict[str, list[Any]], env: dist.DistEnv) -> dict[str, list[Any]] | None:
    """Every rank's lists (one entry per local member), concatenated in member order on rank 0 (None elsewhere)."""
    parts = dist.gather_to_main(values, env)
    if parts is None:
        return None
    return {tag: [v for part in parts for v in part[tag]] for tag in parts[0]}


def train_population(config: Config, run_dir: Path, env: dist.DistEnv) -> RunResult:
    """Train the population ``config`` describes; rank 0 writes the results into ``run_dir``."""
    members = expand_members(config)
    check_population(config, env.world_size, members)
    start, stop = shard_bounds(len(members), env.rank, env.world_size)
    local = members[start:stop]
    dtype = param_dtype(config.trainer.precision)
    data, standardizer = build_training_data(config.data, config.seed)  # every rank holds every row
    data = data.to(env.device, dtype)
    require_in_memory(data, "a population (population.size > 1, and dtrain lr-find)")
    counted = default_metrics(data.task)  # what a population logs per member besides the loss
    if config.metrics is not None and not all(isinstance(m, str) and m in counted for m in config.metrics):
        raise ConfigError(
            f"metrics={config.metrics}: a population logs val/loss (and val/accuracy for classification) per "
            "member; train single runs (a sweep) for other metrics"
        )
    check_objective(config, data, counted)
    model = build_stacked(local, data, env.device, dtype)
    # Every rank trains on all the data: the population, not the data, is what is split.
    batches = ShardedBatches(data.train, config.trainer.batch_size, 0, 1, config.seed, config.trainer.grad_accum_steps)
    torch.manual_seed(config.seed + 1 + env.rank)  # dropout
    if config.population.chunk:
        model.chunk = min(config.population.chunk, model.size)
    else:
        x, y = next(batches.epoch(0))[0]
        with torch.random.fork_rng():  # timing draws dropout masks: training must not depend on how many
            model.chunk, timings = pick_chunk(model, x, y)
        if timings:
            shown = ", ".join(f"{c}: {1e3 * t:.3g}" for c, t in timings.items())
            log.info("members fused per step: %d (ms per member step by chunk size: %s)", model.chunk, shown)

    open_run_dir(run_dir, config, env, fresh=True)
    if env.is_main:
        log.info(
            "run directory: %s (population of %d on %d rank(s), %s)", run_dir, len(members), env.world_size, env.device
        )
        log.info(
            "%s", data_summary(data, source_of(config.data), 1, batches.global_batch, standardizer)
        )  # every rank has all rows
    logger = PopulationLogger(run_dir, members, env.is_main, config.trainer.progress)

    def report(step: int, values: dict[str, list[float]]) -> None:
        gathered = _gather(values, env)
        if gathered is not None:
            logger.scalars(step, gathered)

    def any_training(local_answer: bool) -> bool:
        if not env.distributed:
            return local_answer
        dist.current_op("population: do any members still train (all-reduce)")
        flag = torch.tensor([float(local_answer)], device=env.device)
        return bool(dist.all_reduce_sum(flag, env).item() > 0)

    try:
        cadence = Cadence.of(config, batches.steps_per_epoch)
        sections = config.trainer, config.optim.name, config.optim.nesterov
        fit = fit_population(model, local, data, batches, cadence, *sections, report, any_training)
        results = _gather_fit(fit, env)
        result = RunResult("", run_dir, {})
        if env.is_main:
            assert results is not None
            result = _write_results(run_dir, config, members, results, logger, env.world_size)
    finally:
        logger.close()
    # Every rank ends as rank 0 says (its exit status does not depend on its own share).
    result.status = dist.broadcast_str(result.status, env)
    dist.barrier(env)
    if not env.is_main:
        result.summary = {"status": result.status}
    return result


def _gather_fit(fit: PopulationFit, env: dist.DistEnv) -> PopulationFit | None:
    """Every rank's results on rank 0 (None elsewhere): per-member lists in member order, throughput summed."""
    per_member = ("status", "steps", "metrics", "first_loss", "min_loss", "last_loss")
    fields = {name: getattr(fit, name) for name in per_member}
    merged = _gather(fields | {"member_samples_per_sec": [fit.member_samples_per_sec]}, env)
    if merged is None:
        return None
    return dataclasses.replace(
        fit,
        **{name: merged[name] for name in per_member},
        member_samples_per_sec=sum(merged["member_samples_per_sec"]),  # every rank's members
    )


def _write_results(
    run_dir: Path,
    config: Config,
    members: list[Member],
    results: PopulationFit,
    logger: PopulationLogger,
    world_size: int,
) -> RunResult:
    rows = leaderboard.make_rows(members, results.status, results.steps, results.metrics)
    for row, member_logger in zip(rows, logger.members, strict=True):
        hparams = {key: float(value) for key, value in row.member.values.items()}
        member_logger.hparams(hparams | {"member": row.member.index, "status": row.status}, hparam_metrics(row.metrics))
    ranked = leaderboard.rank_rows(rows, config.objective.mode)
    leaderboard.write_leaderboard(run_dir, ranked, config)
    best = ranked[0]
    completed = best.status == "completed"
    if completed:
        leaderboard.write_best_preset(run_dir, best)
    diverged = sum(row.status == "diverged" for row in rows)
    summary: dict[str, Any] = dict(sorted(best.metrics.items())) if completed else {}
    summary.update(
        steps=results.total_steps,
        samples_per_sec=results.member_samples_per_sec,
        wall_time_s=results.wall_time_s,
        world_size=world_size,
        status="completed" if completed else "diverged",
        population_size=len(members),
        population_diverged=diverged,
        best_member=best.member.index,
        best_values=best.member.values,
    )
    write_atomic(run_dir / "metrics.json", metrics_json(summary).encode())
    metric = objective_metric(config.objective.metric, best.metrics)
    lines = [f"population of {len(members)}: {len(members) - diverged} completed, {diverged} diverged"]
    lines += [
        f"  {place}. member {row.member.index} ({describe(row.member)}): {metric}={row.objective:.6g}"
        + ("" if row.status == "completed" else f" (diverged at step {row.steps})")
        for place, row in enumerate(ranked[:5], start=1)
    ]
    lines.append(f"  leaderboard   {run_dir / 'population.csv'}")
    if completed:
        lines.append(f"  rerun best    {leaderboard.rerun_command(run_dir)}")
    lines.append(f"  tensorboard   tensorboard --logdir {run_dir}")
    message = "" if completed else "every member of the population diverged"
    return RunResult(summary["status"], run_dir, summary, message, table="\n".join(lines), population=results)
