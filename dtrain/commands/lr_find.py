"""``dtrain lr-find``: a population over a log range of learning rates, and where training stops being stable.

Every member trains the configured model with its own rate for a short budget (``--steps``). A member is
*unstable* when its loss went non-finite, ended above where it started, or rose at the end to more than
``--rise`` times its lowest value (a quadratic under gradient descent below its stability limit never
rises at all). The report gives

* the largest stable rate: the largest rate such that it and every smaller one are stable;
* the best rate: the stable rate with the lowest final loss;
* where training diverges: the smallest unstable rate above the largest stable one.

``--refine N`` trains N more populations between the largest stable rate and the first unstable one, so
the boundary is known to a fraction of a percent rather than to the spacing of the first sweep. For a
model with few parameters the largest eigenvalue of the loss Hessian at the initial weights is shown too:
plain full-batch gradient descent is stable only below ``2 / lambda_max`` there (everywhere, for a
quadratic loss such as the polynomial's).

Results: ``lr_find.json`` and ``lr_find.png`` in the output directory, each round's population beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain import launch_env
from dtrain.atomic import write_atomic
from dtrain.compose import compose_config
from dtrain.config import Config, ConfigError
from dtrain.errors import UserError
from dtrain.models import build_initial_model
from dtrain.population.members import evenly_spaced
from dtrain.population.run import is_population
from dtrain.results import finite_or_none
from dtrain.run import train

HESSIAN_MAX_PARAMS = 2000  # an exact Hessian beyond this costs more than the search itself


@dataclass
class Trial:
    """One member's rate and how its loss went."""

    lr: float
    first: float
    lowest: float
    last: float
    status: str  # completed | diverged (non-finite)

    def stable(self, rise: float) -> bool:
        finite = self.status == "completed" and all(math.isfinite(v) for v in (self.first, self.lowest, self.last))
        return finite and self.last <= self.first and self.last <= rise * self.lowest


@dataclass
class Finding:
    """What the search found; rates are None where the search range did not contain them."""

    largest_stable: float | None
    best: float | None
    diverges_at: float | None
    configured: float
    configured_loss: float | None
    best_loss: float | None
    hessian_lambda_max: float | None


def analyse(trials: list[Trial], rise: float, configured: float, hessian: float | None) -> Finding:
    """The largest stable, the best and the first unstable rate of ``trials`` (any order)."""
    ordered = sorted(trials, key=lambda t: t.lr)
    largest_stable = diverges_at = None
    for trial in ordered:
        if not trial.stable(rise):
            diverges_at = trial.lr
            break
        largest_stable = trial.lr
    stable = [t for t in ordered if t.stable(rise) and (largest_stable is None or t.lr <= largest_stable)]
    best = min(stable, key=lambda t: t.last) if stable else None
    at_configured = [t for t in ordered if math.isclose(t.lr, configured, rel_tol=1e-12)]
    configured_loss = at_configured[0].last if at_configured and at_configured[0].stable(rise) else None
    return Finding(
        largest_stable=largest_stable,
        best=best.lr if best else None,
        diverges_at=diverges_at,
        configured=configured,
        configured_loss=configured_loss,
        best_loss=best.last if best else None,
        hessian_lambda_max=hessian,
    )


def hessian_lambda_max(config: Config) -> float | None:
    """The largest eigenvalue of the full-batch training loss's Hessian at the initial weights (float64),
    for models with at most HESSIAN_MAX_PARAMS parameters; None for larger ones and the graph engine."""
    from torch.func import functional_call

    from dtrain.data.registry import build_training_data
    from dtrain.models import gradient_source
    from dtrain.train.objective import build_loss

    data = build_training_data(config.data, config.seed)[0].to(torch.device("cpu"), torch.float64)
    if not data.in_memory:  # the full-batch Hessian would read every row; lr-find's population refuses it anyway
        return None
    model = build_initial_model(config, data).to(torch.float64)
    if gradient_source(model) == "engine":  # its loss is not a torch function of the parameters
        return None
    named = dict(model.named_parameters())
    if sum(p.numel() for p in named.values()) > HESSIAN_MAX_PARAMS:
        return None
    model.eval()
    shapes = {name: p.shape for name, p in named.items()}
    flat = torch.cat([p.detach().flatten() for p in named.values()])
    compute = build_loss(config.loss, data.task, data.num_classes).fn

    def loss(vector: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            params[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return compute(functional_call(model, params, (data.train.x,)), data.train.y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])


def plain_gradient_descent(config: Config) -> bool:
    """Full-batch SGD without momentum, weight decay, clipping, dropout or a moving schedule: where
    ``2 / lambda_max`` of the loss's Hessian is gradient descent's stability limit."""
    optim, trainer, schedule = config.optim, config.trainer, config.schedule
    return (
        optim.name == "sgd"
        and optim.momentum == 0
        and optim.weight_decay == 0
        and trainer.batch_size is None
        and trainer.clip_grad_norm is None
        and trainer.clip_grad_value is None
        and schedule.name == "constant"
        and schedule.warmup == 0
        and getattr(config.model, "dropout", 0.0) == 0
    )


def population_config(config: Config, rates: list[float], steps: int) -> Config:
    """``config`` as a population with one member per rate, trained for ``steps`` steps."""
    pop = dataclasses.replace(
        config.population,
        size=len(rates),
        optim=dataclasses.replace(config.population.optim, lr=list(rates)),
    )
    trainer = dataclasses.replace(
        config.trainer,
        max_steps=steps,
        max_epochs=max(config.trainer.max_epochs, steps),
        log_every=max(1, steps // 20),
        figures=False,
        progress="off",
    )
    return dataclasses.replace(config, population=pop, trainer=trainer)


def run_round(config: Config, rates: list[float], steps: int, out: Path) -> list[Trial]:
    """Train one population over ``rates``; each member's loss record."""
    results = train(population_config(config, rates, steps), out).population
    assert results is not None  # lr-find runs on one process: rank 0's
    return [
        Trial(lr, first, lowest, last, status)
        for lr, first, lowest, last, status in zip(
            rates, results.first_loss, results.min_loss, results.last_loss, results.status, strict=True
        )
    ]


def plot(trials: list[Trial], finding: Finding, rise: float, path: Path) -> None:
    """Final loss against the rate (log-log): stable and unstable members, and the rates found."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ordered = sorted(trials, key=lambda t: t.lr)
    stable = [(t.lr, t.last) for t in ordered if t.stable(rise) and t.last > 0]
    # Unstable losses reach 1e30 and beyond: drawn at the top edge (as triangles) so the stable ones stay legible.
    top = 100 * max((loss for _, loss in stable), default=1.0)
    unstable = [(t.lr, min(t.last, top) if math.isfinite(t.last) else top) for t in ordered if not t.stable(rise)]
    if stable:
        axes.scatter(*zip(*stable, strict=True), s=14, color="tab:blue", label="stable: final loss")
    if unstable:
        axes.scatter(*zip(*unstable, strict=True), s=18, color="tab:red", marker="^", label="unstable (clipped)")
    marks = [
        (finding.best, "tab:green", "best"),
        (finding.largest_stable, "tab:blue", "largest stable"),
        (finding.diverges_at, "tab:red", "diverges"),
        (finding.configured, "tab:gray", "configured optim.lr"),
    ]
    if finding.hessian_lambda_max and finding.hessian_lambda_max > 0:
        marks.append((2 / finding.hessian_lambda_max, "black", "2 / Hessian lambda_max"))
    for rate, colour, label in marks:
        if rate is not None:
            axes.axvline(rate, color=colour, linestyle="--", linewidth=1, label=f"{label}: {rate:.4g}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    bottom = min((loss for _, loss in stable), default=top / 1e4)
    axes.set_ylim(bottom / 2, top * 2)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss at the last step")
    axes.set_title("dtrain lr-find")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def describe(finding: Finding) -> list[str]:
    """The report's lines."""

    def rate(value: float | None, missing: str) -> str:
        return f"{value:.4g}" if value is not None else missing

    lines = [
        f"largest stable rate   {rate(finding.largest_stable, 'none: the smallest rate tried is already unstable')}",
        f"best rate             {rate(finding.best, 'none')}"
        + (f"  (final loss {finding.best_loss:.5g})" if finding.best_loss is not None else ""),
        f"diverges at           {rate(finding.diverges_at, 'not within the range tried: raise --max')}",
    ]
    if finding.hessian_lambda_max and finding.hessian_lambda_max > 0:
        limit = 2 / finding.hessian_lambda_max
        lines.append(
            f"Hessian lambda_max    {finding.hessian_lambda_max:.5g} at the initial weights: gradient descent is "
            f"stable below 2/lambda_max = {limit:.4g}"
        )
    configured = f"configured optim.lr   {finding.configured:.4g}"
    if finding.configured_loss is None:
        configured += ": unstable"
    else:
        configured += f": final loss {finding.configured_loss:.5g}"
        if finding.best is not None and finding.best_loss:
            ratio = finding.configured_loss / finding.best_loss
            configured += f", {ratio:.3g}x the best's; the best rate is {finding.best / finding.configured:.3g}x larger"
    lines.append(configured)
    return lines


def main(argv: list[str]) -> int:
    """``dtrain lr-find [--min LO] [--max HI] [--members M] [--steps N] [--refine R] [--out DIR] [overrides]``."""
    parser = argparse.ArgumentParser(prog="dtrain lr-find", description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=1e-4, help="smallest rate (default 1e-4)")
    parser.add_argument("--max", type=float, default=1.0, help="largest rate (default 1)")
    parser.add_argument("--members", type=int, default=64, help="rates per round (default 64)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per member (default 300)")
    parser.add_argument("--refine", type=int, default=1, help="rounds that narrow the boundary (default 1)")
    parser.add_argument("--rise", type=float, default=1.1, help="final/lowest loss that counts as rising (1.1)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default outputs/lr-find/<time>)")
    args, overrides = parser.parse_known_args(argv)
    if launch_env.under_torchrun() or launch_env.under_slurm():
        raise UserError("lr-find runs in one process: start it with dtrain lr-find, not under torchrun or srun")
    if not 0 < args.min < args.max or not math.isfinite(args.max):
        raise UserError(f"--min={args.min:g} --max={args.max:g}: need 0 < min < max")
    for flag in ("members", "steps"):
        if getattr(args, flag) < 2:
            raise UserError(f"--{flag}={getattr(args, flag)} must be at least 2")
    if args.refine < 0 or not (math.isfinite(args.rise) and args.rise >= 1):
        raise UserError(f"--refine={args.refine} must be >= 0 and --rise={args.rise:g} a number >= 1")
    config = compose_config(overrides)
    if is_population(config):
        raise ConfigError("lr-find makes its own population: drop the population.* overrides")
    if config.trainer.strategy == "fsdp":  # its rates train side by side as one population on each device
        raise ConfigError(
            "lr-find trains its rates as one population on each device, which cannot be sharded: "
            "drop trainer.strategy=fsdp (the rate it finds holds for the sharded run too)"
        )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    out = args.out or Path("outputs") / "lr-find" / stamp
    configured = config.optim.lr
    rates = sorted(set(evenly_spaced(args.min, args.max, args.members, log=True)) | {configured})
    trials = run_round(config, rates, args.steps, out / "round0")
    rise = args.rise
    for round_index in range(1, args.refine + 1):
        found = analyse(trials, rise, configured, None)
        if found.largest_stable is None or found.diverges_at is None:
            break
        low, high = found.largest_stable, found.diverges_at
        inner = [low + (high - low) * (i + 1) / (args.members + 1) for i in range(args.members)]
        trials += run_round(config, inner, args.steps, out / f"round{round_index}")
    hessian = hessian_lambda_max(config) if plain_gradient_descent(config) else None
    finding = analyse(trials, rise, configured, hessian)
    plot(trials, finding, rise, out / "lr_find.png")
    record: dict[str, Any] = {
        "finding": dataclasses.asdict(finding),
        "rise": rise,
        "steps": args.steps,
        "trials": [dataclasses.asdict(t) | {"stable": t.stable(rise)} for t in sorted(trials, key=lambda t: t.lr)],
    }
    write_atomic(out / "lr_find.json", (json.dumps(finite_or_none(record), indent=2, allow_nan=False) + "\n").encode())
    print(
        f"lr-find: model={config.model.name} data={config.data.name} optim={config.optim.name}, "
        f"{len(trials)} rates x {args.steps} steps"
    )
    for line in describe(finding):
        print(f"  {line}")
    if config.trainer.batch_size is not None:
        print("  note: with mini-batches each loss compared is one batch's; full batch (the default) is steadier")
    print(f"  plot                  {out / 'lr_find.png'}")
    return 0
