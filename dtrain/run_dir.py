"""The run directory: one per launch, the same on every rank; rank 0 alone creates and writes it.

Used by single runs and populations alike. Every check of the user's input happens before
:func:`open_run_dir`, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from dtrain import checkpoint, dist
from dtrain.atomic import write_atomic
from dtrain.config import Config, as_yaml
from dtrain.errors import UserError


def agree_on_run_dir(local: Path, env: dist.DistEnv) -> Path:
    """Every rank uses rank 0's run directory.

    On one node all ranks compute the same name already (see :func:`launch_env.launch_id`); across nodes
    that did not share a ``--rdzv-id`` they may not, so rank 0's choice wins and a rank that made
    an empty directory of its own removes it.
    """
    chosen = Path(dist.broadcast_str(str(local.resolve()), env))
    if chosen != local.resolve():
        with contextlib.suppress(OSError):
            local.rmdir()  # only succeeds if this rank's directory is empty
    return chosen


def open_run_dir(run_dir: Path, config: Config, env: dist.DistEnv, fresh: bool) -> None:
    """Rank 0 prepares the run directory (:func:`prepare_run_dir`); an ``OSError`` there is one line on every rank."""
    error = ""
    if env.is_main:
        try:
            prepare_run_dir(run_dir, config, fresh)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = f"cannot write the run directory {run_dir}: {reason}; choose another with hydra.run.dir=..."
    if error := dist.first_error(error, env):
        raise UserError(error)


def prepare_run_dir(run_dir: Path, config: Config, fresh: bool) -> None:
    """Create the run directory (rank 0). A fresh run writes its config.yaml; ``resume=never`` with
    ``checkpoint.overwrite=true`` deletes the earlier run's checkpoints. A resumed run keeps its config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume == "never" and config.checkpoint.overwrite:
        checkpoint.remove_all(run_dir)
    if fresh or not (run_dir / "config.yaml").exists():
        write_atomic(run_dir / "config.yaml", as_yaml(config).encode())
