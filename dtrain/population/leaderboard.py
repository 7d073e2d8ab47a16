"""A population's results on disk: the leaderboard (``population.csv``, ``population.json``) and the best
member as a preset that reruns it alone (``experiment/best.yaml``)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dtrain.atomic import write_atomic
from dtrain.config import Config, to_plain
from dtrain.population.members import Member, describe
from dtrain.results import finite_or_none, objective_metric, objective_value

# The config sections a rerun needs; the rest (dist, checkpoint, resume, fault) keep their defaults.
PRESET_SECTIONS = ("seed", "init_seed", "model", "data", "loss", "metrics", "optim", "schedule", "trainer", "objective")


@dataclass
class Row:
    """One member's line of the leaderboard."""

    member: Member
    status: str
    steps: int
    metrics: dict[str, float]
    objective: float


def rank_rows(rows: list[Row], mode: str) -> list[Row]:
    """Best first by the objective (diverged members last, in member order)."""

    def key(row: Row) -> tuple[int, float, int]:
        value = row.objective if mode == "min" else -row.objective
        return (0 if math.isfinite(value) else 1, value if math.isfinite(value) else 0.0, row.member.index)

    return sorted(rows, key=key)


def make_rows(members: list[Member], status: list[str], steps: list[int], metrics: list[dict[str, float]]) -> list[Row]:
    """Rows with each member's objective computed as a single run's would be."""
    rows = []
    for member, s, n, values in zip(members, status, steps, metrics, strict=True):
        objective = member.config.objective
        summary = {**values, "status": s}
        rows.append(Row(member, s, n, values, objective_value(summary, objective.metric, objective.mode)))
    return rows


def member_name(index: int, size: int) -> str:
    """``m007``: zero-padded so the members sort in order in TensorBoard's run list."""
    return f"m{index:0{max(3, len(str(size - 1)))}d}"


def write_leaderboard(run_dir: Path, ranked: list[Row], config: Config) -> None:
    """``population.csv`` (one line per member, best first) and ``population.json`` (the same, and the best)."""
    varied = list(ranked[0].member.values) if ranked else []
    metric_names = sorted({k for row in ranked for k in row.metrics if k.startswith(("train/", "val/"))})
    metric = objective_metric(config.objective.metric, ranked[0].metrics) if ranked else config.objective.metric
    size = len(ranked)
    records = [
        {
            "place": place,
            "member": row.member.index,
            "run": f"members/{member_name(row.member.index, size)}",
            "status": row.status,
            "steps": row.steps,
            "objective": finite_or_none(row.objective),
            **{key: row.member.values[key] for key in varied},
            **{name: finite_or_none(row.metrics.get(name)) for name in metric_names},
        }
        for place, row in enumerate(ranked, start=1)
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]) if records else ["place"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_atomic(run_dir / "population.csv", text.getvalue().encode())
    document = {
        "objective": {"metric": metric, "mode": config.objective.mode},
        "varied": varied,
        "best": records[0] if records and ranked[0].status == "completed" else None,
        "rerun_best": rerun_command(run_dir) if records and ranked[0].status == "completed" else None,
        "members": records,
    }
    write_atomic(run_dir / "population.json", (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())


def rerun_command(run_dir: Path) -> str:
    """The command that trains the best member alone from its preset."""
    return f"python -m dtrain --config-dir {run_dir} experiment=best"


def _option(section: str, values: dict[str, Any]) -> str:
    """The config-group option a section's values extend: its ``name`` (schedules all extend ``constant``'s
    schema; every value is written out, so the option only has to have the right schema)."""
    if "_target_" in values:  # a user's own model or loss: the open option
        return "custom"
    return str(values["name"]) if section != "schedule" else "constant"


def write_best_preset(run_dir: Path, best: Row) -> Path:
    """``experiment/best.yaml`` under the run directory: the best member's whole config as a Hydra preset."""
    plain = to_plain(best.member.config)
    groups = ("model", "data", "loss", "optim", "schedule")
    body = {key: plain[key] for key in PRESET_SECTIONS}
    preset = OmegaConf.create(body)
    defaults = "\n".join(f"  - override /{g}: {_option(g, plain[g])}" for g in groups)
    header = (
        "# @package _global_\n"
        f"# Member {best.member.index} of the population in {run_dir} ({describe(best.member)}),\n"
        f"# objective {best.objective:.6g}. Train it alone with:\n"
        f"#   {rerun_command(run_dir)}\n"
        f"defaults:\n{defaults}\n"
    )
    path = run_dir / "experiment" / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (header + OmegaConf.to_yaml(preset)).encode())
    return path
