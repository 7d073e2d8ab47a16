"""Entry point: ``python -m dtrain`` and the ``dtrain`` console script, on one process or under torchrun.

Hydra composes the config from ``conf/`` and the command-line overrides; we check it against the
schema, train, and turn the user's mistakes into one line on stderr and a non-zero exit.

Exit status: 0 completed, 2 a bad config value or input (``dtrain: error: ...`` on stderr),
3 training diverged, 4 a collective failed (another rank died or hangs), 75 stopped by SIGTERM or
SIGUSR1 after saving a checkpoint (EX_TEMPFAIL: run it again to resume), 1 anything else (a bug:
full traceback). ``HYDRA_FULL_ERROR=1`` shows tracebacks for the user's mistakes too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain import launch_env
from dtrain.commands import SUBCOMMANDS
from dtrain.compose import config_dir
from dtrain.config import load, register_configs
from dtrain.errors import PeerFailure, RankLocalError, UserError
from dtrain.overrides import normalise

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PEER_FAILURE = 4
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the same command will succeed later
QUIET_EXIT_GRACE_S = 1.0  # how long a rank that stays quiet about a shared mistake waits before exiting
# Read once, before main() sets the variable for Hydra: the user's own wish for tracebacks.
SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"


def setup_logging(rank: int) -> None:
    """Rank 0 logs progress to stdout; other ranks only warnings, to stderr, marked with their rank."""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    logger = logging.getLogger("dtrain")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def fail(message: str, code: int, quiet: bool = False, said: bool = False) -> None:
    """Print ``dtrain: error: message`` on stderr (unless ``quiet``) and exit with ``code``.

    A quiet rank under torchrun leaves the saying to rank 0. Unless rank 0 has ``said`` it already (the ranks
    agreed on it, :func:`dtrain.run.say_once`), it waits a moment first: torchrun stops every worker at the
    first exit and could cut rank 0 off mid-sentence."""
    if not quiet:
        print(f"dtrain: error: {message}", file=sys.stderr, flush=True)
    else:
        let_rank0_speak(said)
    if code == EXIT_USER_ERROR:  # a peer's "collective failed" must not become torchrun's root cause
        launch_env.tell_torchrun(f"dtrain: error: {message}")  # the last line of torchrun's own failure summary
    sys.exit(code)


def let_rank0_speak(said: bool) -> None:
    """Before a quiet rank ends: a moment for rank 0 to say the shared mistake, unless it has (see :func:`fail`)."""
    if not said and launch_env.under_torchrun():
        time.sleep(QUIET_EXIT_GRACE_S)


OmegaConf.register_new_resolver("dtrain_launch", launch_env.launch_id, use_cache=True, replace=True)
register_configs()


class _TaskState:
    """Whether a job is running: Hydra errors raised outside one come from composing the config."""

    running = False


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_task(cfg: DictConfig) -> float:
    """One training job as Hydra runs it (once, or per trial under ``-m``)."""
    _TaskState.running = True
    try:
        return _run_job(cfg)
    finally:
        _TaskState.running = False


def _run_job(cfg: DictConfig) -> float:
    rank = launch_env.rank()
    setup_logging(rank)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    worst = -math.inf if OmegaConf.select(cfg, "objective.mode") == "max" else math.inf
    try:
        if sweeping and (launch_env.under_torchrun() or launch_env.under_slurm()) and not placed_by_submitit():
            raise UserError(
                "a sweep (-m) runs trials, not ranks: start it outside torchrun/srun (python -m dtrain -m ...); "
                "hydra/launcher=torchrun or hydra/launcher=slurm gives each trial its ranks"
            )
        config = load(cfg)
        from dtrain.run import train  # the trainer (and torch's heavier parts) only once the config is good

        result = train(config, Path(HydraConfig.get().runtime.output_dir))
    except UserError as exc:
        if rank == 0:
            remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        if SHOW_TRACEBACKS:
            raise
        # Most errors are the same on every rank: say them once (run.say_once may have said it already).
        said = getattr(exc, "said", False)
        quiet = said or (rank != 0 and not isinstance(exc, RankLocalError))
        if sweeping:  # one bad trial must not end the sweep: report it and score it as the worst
            if not quiet:
                print(f"dtrain: error: {exc}", file=sys.stderr, flush=True)
            else:
                let_rank0_speak(said)
            return worst
        code = EXIT_PEER_FAILURE if isinstance(exc, PeerFailure) else EXIT_USER_ERROR
        fail(str(exc), code, quiet=quiet, said=said)
    if result.status in ("diverged", "preempted"):
        if rank == 0:
            print(f"dtrain: {result.message}", file=sys.stderr, flush=True)
        if not sweeping:
            sys.exit(EXIT_DIVERGED if result.status == "diverged" else EXIT_PREEMPTED)
    elif rank == 0:
        logging.getLogger("dtrain").info("%s", result.table)
    return result.objective(config.objective.metric, config.objective.mode)


def placed_by_submitit() -> bool:
    """Whether hydra-submitit-launcher started this job: then this process is one rank of one trial."""
    target = OmegaConf.select(HydraConfig.get(), "launcher._target_", default="")
    return str(target).startswith("hydra_plugins.hydra_submitit_launcher.")


def remove_if_empty(run_dir: Path) -> None:
    """Remove the run directory Hydra made for a run that failed before writing anything into it."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # fails, harmlessly, unless the directory is empty


def hydra_error_line(exc: BaseException) -> str:
    """Hydra's multi-line composition error as one line: what failed, why, and the valid options."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else type(exc).__name__
    if text.endswith(":") and len(lines) > 1:  # the reason is on the next line
        text += " " + lines[1].rstrip(".")
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text += ": " + str(cause).strip().splitlines()[0].rstrip(".")
    options = [o for o in getattr(exc, "options", None) or [] if not o.startswith("base_")]  # hide schemas
    if options:
        text += f"; available: {', '.join(options)}"
    return text


def run_subcommand(name: str, argv: list[str]) -> None:
    """``dtrain gradcheck|report|lr-find ...``: user errors as one line (exit 2), a failed check exits 1."""
    import importlib

    try:
        code = importlib.import_module(SUBCOMMANDS[name]).main(argv)
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        if SHOW_TRACEBACKS:
            raise
        message = str(exc) if isinstance(exc, UserError) else hydra_error_line(exc)
        fail(message, EXIT_USER_ERROR)
    sys.exit(code)


def main() -> None:
    """Console-script entry: ``dtrain [hydra overrides]`` trains; ``dtrain gradcheck [...]`` checks gradients;
    ``dtrain report RUN_DIR [...]`` writes an HTML report of runs."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        run_subcommand(sys.argv[1], sys.argv[2:])
    # Let Hydra's own errors (unknown group option, unknown key, unparsable override) reach us, so
    # they are reported as one line like ours; HYDRA_FULL_ERROR=1 set by the user keeps tracebacks.
    # Errors raised while a job runs are bugs (user errors there are UserError) and keep their traceback.
    try:
        sys.argv[1:] = normalise(sys.argv[1:])  # model._target_=X selects model=custom (dtrain.overrides)
    except UserError as exc:
        fail(str(exc), EXIT_USER_ERROR, quiet=launch_env.rank() != 0)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_task()
    except (HydraException, OmegaConfBaseException) as exc:
        if SHOW_TRACEBACKS or _TaskState.running:
            raise
        fail(hydra_error_line(exc), EXIT_USER_ERROR, quiet=launch_env.rank() != 0)
    except OSError as exc:  # Hydra creates the run directory before the job starts
        if SHOW_TRACEBACKS or _TaskState.running:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or str(exc)
        message = f"cannot create the run directory{where}: {reason}; choose another with hydra.run.dir=..."
        fail(message, EXIT_USER_ERROR, quiet=launch_env.rank() != 0)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
