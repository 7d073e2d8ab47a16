"""Reading a run directory (see ``dtrain/run.py``) into a :class:`RunData`: the scalars from the TensorBoard
event files (read with TensorBoard's own reader), the config from ``config.yaml`` and the status from
``metrics.json``; a :class:`UserError` saying why where a path is not a run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.errors import UserError

EVENT_GLOB = "events.out.tfevents.*"


@dataclass
class Series:
    """One scalar tag of one run: steps and values (non-finite values kept as they were logged)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunData:
    """What the report needs from one run directory."""

    path: Path
    name: str  # the directory's name (with its parent's where two runs share one)
    config: dict[str, Any]  # config.yaml as nested plain values
    config_text: str
    scalars: dict[str, Series]
    metrics: dict[str, Any]  # metrics.json; {} while a run is going on or after it was killed
    label: str = ""  # set by dtrain.report.labels.label_runs, like name and differences
    differences: dict[str, str] = field(default_factory=dict)  # this run's values of the differing keys

    @property
    def status(self) -> str:
        """``completed``, ``diverged``, ``preempted`` (from metrics.json), or ``unfinished`` without one."""
        return str(self.metrics.get("status", "unfinished"))

    @property
    def diverged_at(self) -> int | None:
        """The first logged step whose loss or gradient norm is not finite (the last step if the run says it
        diverged without one logged), else None."""
        steps = [
            int(series.steps[~np.isfinite(series.values)][0])
            for tag in ("train/loss", "grad_norm/total")
            if (series := self.scalars.get(tag)) is not None and not np.isfinite(series.values).all()
        ]
        if steps:
            return min(steps)
        if self.status == "diverged" and "train/loss" in self.scalars and len(self.scalars["train/loss"].steps):
            return int(self.scalars["train/loss"].steps[-1])
        return None


def read_run(path: Path) -> RunData:
    """Read one run directory, or raise :class:`UserError` saying why it is not one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give dtrain run directories (outputs/<date>/<time>-<id>)")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        nested = sorted({p.parent for p in [*path.glob("*/config.yaml"), *path.glob("*/*/config.yaml")]})
        hint = f"; the runs below it are e.g. {nested[0]}" if nested else ""
        raise UserError(f"{path} is not a dtrain run directory (no config.yaml){hint}")
    if not any(path.glob(EVENT_GLOB)):
        raise UserError(f"{path} has no TensorBoard event files ({EVENT_GLOB}): did the run start training?")
    try:
        config_text = config_file.read_text()
        config = OmegaConf.to_container(OmegaConf.create(config_text), resolve=False)
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as exc:
        raise UserError(f"cannot read {config_file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} does not hold a config mapping")
    scalars = read_scalars(path)
    if not scalars:
        raise UserError(f"{path}'s event files hold no training scalars: did the run log a step?")
    metrics: dict[str, Any] = {}
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {metrics_file}: {exc}") from None
    return RunData(path, path.name, config, config_text, scalars, metrics)


def read_scalars(path: Path) -> dict[str, Series]:
    """Every training scalar in the directory's event files, read with TensorBoard's own reader (which also
    drops the steps a resumed run logged again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Images and histograms are parsed anyway; keeping one of each instead of all saves memory.
    guidance = {"scalars": 0, "images": 1, "histograms": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    accumulator = EventAccumulator(str(path), size_guidance=guidance)
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.startswith("hparam/"):  # the final metrics again, for the HParams dashboard, at step 0
            continue
        events = accumulator.Scalars(tag)
        out[tag] = Series(
            np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=float)
        )
    return out
