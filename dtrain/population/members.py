"""Who the members of a population are: their values of the varied settings, and each one's own config.

``population.<key>=VALUES`` varies a setting across members. VALUES is

* a list, ``[0.01,0.1,1.0]``: member i takes the i-th value;
* ``logspace:LO:HI`` / ``linspace:LO:HI``: evenly spaced (in log or linear scale) from LO to HI, one value
  per member; ``logspace:LO:HI:N`` gives N values (for a grid);
* ``loguniform:LO:HI`` / ``uniform:LO:HI``: drawn at random with ``population.draw_seed``;
* for ``population.init_seed`` also ``each``: the run's seed plus the member's index.

With ``population.grid=true`` the lists and spaces are the axes of a grid and there is one member per
combination. The colon form needs no quoting in a shell or in Hydra's override grammar.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

from dtrain.config import Config, ConfigError, check

# population key -> how to set it on a member's config
VARIED_KEYS = (
    "optim.lr",
    "optim.momentum",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "trainer.clip_grad_norm",
    "schedule.decay",
    "schedule.gamma",
    "schedule.min_lr",
    "init_seed",
)
SPEC_FORMS = "a list [a,b,...], logspace:LO:HI[:N], linspace:LO:HI[:N], loguniform:LO:HI or uniform:LO:HI"


@dataclass(frozen=True)
class Member:
    """One member: its index in the population, its values of the varied keys, and its config as a single run."""

    index: int
    values: dict[str, float | int]
    config: Config


def varied_specs(config: Config) -> dict[str, Any]:
    """``population.<key>`` values that are set, by key (``optim.lr``, ..., ``init_seed``), in VARIED_KEYS order."""
    pop = config.population
    specs: dict[str, Any] = {}
    for key in VARIED_KEYS:
        section, _, name = key.partition(".")
        value = getattr(pop, section) if not name else getattr(getattr(pop, section), name)
        if value is not None:
            specs[key] = value
    return specs


def _number(key: str, text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"population.{key}={spec!r}: {text!r} is not a number; use {SPEC_FORMS}") from None


def _axis(key: str, spec: Any, count: int | None, draw: random.Random, base_seed: int) -> list[float | int]:
    """The values ``spec`` gives; ``count`` is the number of members (None on a grid, where it must say)."""
    if isinstance(spec, list | tuple):
        if not spec:
            raise ConfigError(f"population.{key}=[] is empty; give one value per member")
        for value in spec:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"population.{key}: {value!r} in {list(spec)} is not a number")
        return list(spec)
    if isinstance(spec, str) and key == "init_seed" and spec == "each":
        if count is None:
            raise ConfigError("population.init_seed=each has no length on a grid; give a list of seeds")
        return [base_seed + i for i in range(count)]
    parts = spec.split(":") if isinstance(spec, str) else []
    kind = parts[0] if parts else ""
    if kind not in ("logspace", "linspace", "loguniform", "uniform") or len(parts) not in (3, 4):
        raise ConfigError(f"population.{key}={spec!r} is not a value list or range; use {SPEC_FORMS}")
    lo, hi = _number(key, parts[1], spec), _number(key, parts[2], spec)
    if kind.startswith("log") and not (lo > 0 and hi > 0):
        raise ConfigError(f"population.{key}={spec!r}: {kind} needs LO and HI above 0")
    if count is None and kind.endswith("uniform"):
        space = "logspace" if kind == "loguniform" else "linspace"
        raise ConfigError(f"population.{key}={spec!r}: random draws are not a grid axis; use a list or {space}:LO:HI:N")
    n = count
    if len(parts) == 4:
        if kind.endswith("uniform"):
            raise ConfigError(f"population.{key}={spec!r}: random draws take no count; the population size sets it")
        number = _number(key, parts[3], spec)
        if not (number.is_integer() and number >= 1):
            raise ConfigError(f"population.{key}={spec!r}: the count N={parts[3]} must be a whole number, 1 or more")
        n = int(number)
        if count is not None and n != count:
            raise ConfigError(f"population.{key}={spec!r} gives {n} values for {count} members")
    if n is None:
        raise ConfigError(f"population.{key}={spec!r} needs a count on a grid: {kind}:{parts[1]}:{parts[2]}:N")
    if kind == "loguniform":
        return [math.exp(draw.uniform(math.log(lo), math.log(hi))) for _ in range(n)]
    if kind == "uniform":
        return [draw.uniform(lo, hi) for _ in range(n)]
    return evenly_spaced(lo, hi, n, log=kind == "logspace")


def evenly_spaced(lo: float, hi: float, count: int, log: bool) -> list[float]:
    """``count`` values from ``lo`` to ``hi`` (both included), evenly spaced in log scale or linear scale."""
    fractions = [i / (count - 1) if count > 1 else 0.0 for i in range(count)]
    if log:
        return [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in fractions]
    return [lo + f * (hi - lo) for f in fractions]


def _spec_length(spec: Any) -> int | None:
    """How many values ``spec`` gives by itself (a list, or a space with a count); None if the size decides."""
    if isinstance(spec, list | tuple):
        return len(spec)
    parts = spec.split(":") if isinstance(spec, str) else []
    if len(parts) == 4 and parts[0] in ("logspace", "linspace"):
        try:
            number = float(parts[3])
        except ValueError:
            return None  # _axis names the bad count
        return int(number) if number.is_integer() and number >= 1 else None
    return None


def member_values(config: Config) -> list[dict[str, float | int]]:
    """Each member's values of the varied keys: ``population.size`` dicts (or one per grid point)."""
    pop = config.population
    specs = varied_specs(config)
    draw = random.Random(pop.draw_seed)
    if pop.grid:
        axes = {key: _axis(key, spec, None, draw, config.seed) for key, spec in specs.items()}
        points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
        if pop.size not in (1, len(points)):
            raise ConfigError(f"population.size={pop.size} but the grid has {len(points)} points; leave size at 1")
        return points if specs else [{}]
    size = pop.size
    if size == 1:  # a list or a counted space alone says how many members there are
        lengths = {key: n for key, n in ((k, _spec_length(s)) for k, s in specs.items()) if n is not None}
        if len(set(lengths.values())) > 1:
            given = ", ".join(f"population.{key} has {n}" for key, n in lengths.items())
            raise ConfigError(f"the value lists disagree on the number of members: {given}")
        if lengths:
            size = next(iter(lengths.values()))
    axes = {key: _axis(key, spec, size, draw, config.seed) for key, spec in specs.items()}
    for key, values in axes.items():
        if len(values) != size:
            raise ConfigError(f"population.{key} has {len(values)} values for population.size={size}; give {size}")
    return [{key: values[i] for key, values in axes.items()} for i in range(size)]


def member_config(config: Config, values: dict[str, float | int]) -> Config:
    """The config that trains this member alone: the run's config with the member's values, no population."""
    optim, trainer, schedule, init_seed = config.optim, config.trainer, config.schedule, config.init_seed
    for key, value in values.items():
        section, _, name = key.partition(".")
        if key == "init_seed":
            if not float(value).is_integer():
                raise ConfigError(f"population.init_seed holds {value!r}; seeds are integers")
            init_seed = int(value)
        elif name == "beta1":
            optim = dataclasses.replace(optim, betas=[float(value), optim.betas[1]])
        elif name == "beta2":
            optim = dataclasses.replace(optim, betas=[optim.betas[0], float(value)])
        elif section == "optim":
            optim = dataclasses.replace(optim, **{name: float(value)})
        elif section == "trainer":
            trainer = dataclasses.replace(trainer, **{name: float(value)})
        else:
            schedule = dataclasses.replace(schedule, **{name: float(value)})
    return dataclasses.replace(
        config,
        init_seed=init_seed,
        optim=optim,
        trainer=trainer,
        schedule=schedule,
        population=type(config.population)(),
    )


# Varied keys that only some optimizers or schedules read: varying one the run does not use would give
# identical members.
USED_BY = {
    "optim.momentum": ("optim", ("sgd",)),
    "optim.beta1": ("optim", ("adam", "adamw")),
    "optim.beta2": ("optim", ("adam", "adamw")),
    "optim.eps": ("optim", ("adam", "adamw")),
    "schedule.decay": ("schedule", ("exp_decay",)),
    "schedule.gamma": ("schedule", ("step",)),
    "schedule.min_lr": ("schedule", ("exp_decay", "cosine")),
}


def check_used(config: Config, keys: list[str]) -> None:
    """Refuse a varied key that the configured optimizer or schedule ignores."""
    for key in keys:
        if key not in USED_BY:
            continue
        section, users = USED_BY[key]
        chosen = getattr(config, section).name
        if chosen not in users:
            raise ConfigError(
                f"population.{key}: {section}={chosen} does not use {key}; it matters with {section}="
                + " or ".join(users)
            )


def expand_members(config: Config) -> list[Member]:
    """The population's members, each checked as a run of its own (a bad value names its member)."""
    check_used(config, list(varied_specs(config)))
    members = []
    for index, values in enumerate(member_values(config)):
        single = member_config(config, values)
        try:
            check(single)
        except ConfigError as exc:
            raise ConfigError(f"population member {index} ({_describe(values)}): {exc}") from None
        members.append(Member(index, values, single))
    return members


def _describe(values: dict[str, float | int]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in values.items()) or "no varied values"


def describe(member: Member) -> str:
    """``optim.lr=0.01, init_seed=3``: the member's varied values, for logs and the leaderboard."""
    return _describe(member.values)
