"""Telling runs apart: each run's display name (its directory, made unique) and legend label (the name plus the
hyperparameters that differ between the runs), and the differences themselves for the report's table."""

from __future__ import annotations

from typing import Any

from dtrain.report.runs import RunData

# Config keys that change how a run is watched or stored, not what it learns: left out of the labels.
BOOKKEEPING = (
    "trainer.progress",
    "trainer.figures",
    "trainer.histogram_every",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.device",
    "resume",
    "dist.",
    "checkpoint.",
)
# Differences named in a run's legend label; the rest are in the report's table.
LABEL_DIFFERENCES = 3


def label_runs(runs: list[RunData]) -> None:
    """Set each run's ``label`` and ``differences``: its directory name plus the hyperparameters that differ
    between the runs (bookkeeping such as logging cadence left out), so runs of two presets are told apart."""
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:  # outputs/a/run and outputs/b/run: say which
            run.name = f"{run.path.parent.name}/{run.path.name}"
    names = [r.name for r in runs]
    for i, run in enumerate(runs):
        if names.count(names[i]) > 1:  # the same directory twice, or a/b/run and c/b/run: number them
            run.name = f"{names[i]} #{names[: i + 1].count(names[i])}"
    flats = [flatten(r.config) for r in runs]
    differing = differing_keys(flats)
    short = short_keys(differing)
    for run, flat in zip(runs, flats, strict=True):
        run.differences = {k: format_value(flat[k]) if k in flat else "(unset)" for k in differing}
        shown = [f"{short[k]}={run.differences[k]}" for k in differing[:LABEL_DIFFERENCES]]
        if len(differing) > LABEL_DIFFERENCES:
            shown.append(f"+{len(differing) - LABEL_DIFFERENCES} more")
        run.label = f"{run.name} ({', '.join(shown)})" if shown else run.name


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``, in the config's order."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_value(value: Any) -> str:
    """A config value as it would be written on the command line."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def differing_keys(flats: list[dict[str, Any]]) -> list[str]:
    """The flattened config keys whose values differ between the runs: which model, data, optimizer or schedule
    first (``model.name``...), then the rest in the config's order. Bookkeeping is left out, and so are the
    options of a group whose choice differs that only one choice has (``data.outer_low`` of sine against
    moons): ``data.name`` already says it."""
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    differing = [
        k
        for k in keys
        if not k.startswith(BOOKKEEPING) and len({format_value(f[k]) if k in f else "(unset)" for f in flats}) > 1
    ]
    chosen = {k.rsplit(".", 1)[0] for k in differing if k.endswith(".name")}
    differing = [
        k for k in differing if k.endswith(".name") or k.rsplit(".", 1)[0] not in chosen or all(k in f for f in flats)
    ]
    return sorted(differing, key=lambda k: not k.endswith(".name"))  # stable: config order within each part


def short_keys(keys: list[str]) -> dict[str, str]:
    """Legend-sized names: ``optim.lr`` -> ``lr``, ``schedule.name`` -> ``schedule``, the full key where the
    short one would be ambiguous."""
    short = {k: (k.split(".")[0] if k.endswith(".name") else k.split(".")[-1]) for k in keys}
    return {k: s if list(short.values()).count(s) == 1 else k for k, s in short.items()}
