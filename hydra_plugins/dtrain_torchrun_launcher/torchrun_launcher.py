"""``hydra/launcher=torchrun``: every trial of a sweep is its own torchrun job, started through torch's
elastic launch API (``torch.distributed.launcher.api.elastic_launch``, what ``torchrun`` itself calls).

The sweep (Hydra's sweeper: the basic grid, Optuna, ...) runs in this process, outside the workers.
For each trial the launcher composes the trial's config as Hydra would, takes its directory from
``hydra.sweep.dir``/``hydra.sweep.subdir``, and runs ``python -m dtrain <the trial's overrides>
hydra.run.dir=<that directory>`` on ``nproc_per_node`` ranks. The workers run in Hydra's normal RUN
mode, so dtrain's rule against sweeps inside torchrun never meets them. When the job ends, the trial's
``metrics.json`` gives its objective (``dtrain.results``), which goes back to the sweeper as the job's
return value. A trial that fails (a rank exits non-zero, the rendezvous fails) is reported in one line
and scored as the worst value, and the sweep goes on; a signal that stops the launcher stops the sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dtrain import launch_env

APP_MODULE = "dtrain"  # what each rank runs: python -m dtrain
# Hydra overrides of the sweep that are about the sweep itself: a trial is one plain run in its own directory.
SWEEP_ONLY = ("hydra.mode", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.sweep")
SWEEP_ONLY += ("hydra.run.dir", "hydra.job.num", "hydra.job.id")
# Signals the elastic agent turns into SignalException while it waits for its workers.
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_PLAIN_VALUE = re.compile(r"[\w./@%+~-]+")  # a path Hydra's override grammar takes unquoted


class TorchrunLauncher(Launcher):
    """Runs each job of a sweep as a torchrun job of ``nproc_per_node`` ranks, one job after another."""

    def __init__(
        self,
        nproc_per_node: int = 2,
        nnodes: str = "1",
        max_restarts: int = 0,
        rdzv_backend: str = "c10d",
        rdzv_endpoint: str = "localhost:0",
        rdzv_configs: Any = None,
        monitor_interval: float = 0.1,
        log_dir: str | None = None,
    ) -> None:
        self.nproc_per_node = nproc_per_node
        self.nnodes = nnodes
        self.min_nodes = self.max_nodes = 1  # parsed from nnodes by setup()
        self.max_restarts = max_restarts
        self.rdzv_backend = rdzv_backend
        self.rdzv_endpoint = rdzv_endpoint
        configs = OmegaConf.to_container(rdzv_configs) if OmegaConf.is_config(rdzv_configs) else rdzv_configs
        self.rdzv_configs: dict[str, Any] = dict(configs or {})
        self.monitor_interval = monitor_interval
        self.log_dir = log_dir
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._trial_dirs: dict[str, int] = {}  # directory -> job number, so no two trials share one

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Check the settings and keep the sweep's config (each trial's is composed from it).

        The settings are checked here rather than in ``__init__``: Hydra wraps an error raised while it
        instantiates the launcher in a message of its own, but passes one from ``setup`` on as it is.
        """
        self.min_nodes, self.max_nodes = parse_nnodes(self.nnodes)
        _check_settings(self)
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the batch's trials one after another, each as a torchrun job; each JobReturn's value is
        the trial's objective (the worst value for a trial that failed)."""
        if launch_env.under_torchrun() or launch_env.under_slurm():  # every rank would run the whole sweep
            raise HydraException(
                "a sweep (-m) runs trials, not ranks: start it outside torchrun/srun (python -m dtrain -m ...); "
                "hydra/launcher=torchrun gives each trial its ranks"
            )
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        return [self._run_trial(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]

    # ------------------------------------------------------------------------------------------------

    def _run_trial(self, num: int, overrides: list[str]) -> JobReturn:
        assert self.config is not None and self.hydra_context is not None
        trial_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(trial_cfg):
            trial_cfg.hydra.job.id = num
            trial_cfg.hydra.job.num = num
        previous_hydra_cfg = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(trial_cfg)  # ${hydra:...} in the sweep's paths reads the trial's values
        try:
            trial_dir = os.path.abspath(os.path.join(str(trial_cfg.hydra.sweep.dir), str(trial_cfg.hydra.sweep.subdir)))
            with read_write(trial_cfg.hydra.runtime), open_dict(trial_cfg.hydra.runtime):
                trial_cfg.hydra.runtime.output_dir = trial_dir
            HydraConfig.instance().set_config(trial_cfg)
            self._claim(trial_dir, num)
            callbacks = self.hydra_context.callbacks
            callbacks.on_job_start(config=trial_cfg, task_function=self.task_function)
            shown = " ".join(filter_overrides(overrides))
            print(f"dtrain: trial #{num} ({shown}) on {self.nproc_per_node} rank(s) in {trial_dir}", flush=True)
            metric = str(OmegaConf.select(trial_cfg, "objective.metric", default="auto"))
            mode = str(OmegaConf.select(trial_cfg, "objective.mode", default="min"))
            value = self._score(num, shown, trial_dir, self._command(overrides, trial_dir), metric, mode)
            ret = JobReturn()
            ret.overrides = overrides
            task_cfg = OmegaConf.masked_copy(trial_cfg, [k for k in trial_cfg if k != "hydra"])
            ret.cfg = task_cfg
            ret.hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(trial_cfg.hydra)})
            ret.working_dir = os.getcwd()
            ret.task_name = str(trial_cfg.hydra.job.name)
            ret.status = JobStatus.COMPLETED
            ret.return_value = value
            callbacks.on_job_end(config=trial_cfg, job_return=ret)
            return ret
        finally:
            HydraConfig.instance().cfg = previous_hydra_cfg

    def _claim(self, trial_dir: str, num: int) -> None:
        """Refuse a second trial in a directory this sweep already gave to another (a fixed hydra.sweep.subdir)."""
        other = self._trial_dirs.setdefault(trial_dir, num)
        if other != num:
            raise HydraException(
                f"trials #{other} and #{num} would share the run directory {trial_dir}: "
                "make hydra.sweep.subdir differ per trial (the default is ${hydra.job.num})"
            )

    def _command(self, overrides: list[str], trial_dir: str) -> list[str]:
        """The arguments after ``python``: the sweep's config sources, its Hydra overrides that still apply
        to one run, the trial's own overrides, and its run directory."""
        assert self.config is not None
        args = ["-u", "-m", APP_MODULE]
        for source in self.config.hydra.runtime.config_sources:
            where = str(source.path) if source.schema == "file" else f"{source.schema}://{source.path}"
            if source.provider == "main" and source.schema == "file":
                args += ["--config-path", where]
            elif source.provider == "command-line":
                args += ["--config-dir", where]
        args += ["--config-name", str(self.config.hydra.job.config_name)]
        hydra_overrides = list(OmegaConf.to_container(self.config.hydra.overrides.hydra) or [])
        parsed = OverridesParser.create().parse_overrides(hydra_overrides)
        args += [o.input_line or "" for o in parsed if not _sweep_only(o.key_or_group)]
        args += overrides
        args.append(f"hydra.run.dir={quote_value(trial_dir)}")
        return args

    def _score(self, num: int, shown: str, trial_dir: str, args: list[str], metric: str, mode: str) -> float:
        """Run the trial's torchrun job and return its objective; the worst value if it failed."""
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from dtrain.results import objective_metric, objective_value, read_metrics

        worst = -math.inf if mode == "max" else math.inf
        failure = ""
        with _agent_scope(self.nproc_per_node), self._log_dir() as log_dir:
            try:
                self._elastic_launch(trial_dir, log_dir)(*args)
            except ChildFailedError as exc:
                rank, first = exc.get_first_failure()
                failure = f"rank {rank} {_exit_reason(first.exitcode)}"
            except SignalException as exc:
                # The agent has stopped the workers (they save a checkpoint on SIGTERM); so does the sweep.
                print(f"dtrain: error: sweep stopped by {exc.sigval.name} during trial #{num}", file=sys.stderr)
                sys.exit(128 + int(exc.sigval))
            except Exception as exc:  # the agent itself failed (rendezvous, workers that cannot start)
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failure = f"its torchrun job failed: {type(exc).__name__}: {first_line}"
        if failure:
            with contextlib.suppress(OSError):
                Path(trial_dir).rmdir()  # made by Hydra for a trial that failed before writing anything
        summary = read_metrics(Path(trial_dir))
        value = objective_value(summary, metric, mode)
        status = summary.get("status")
        if failure or not math.isfinite(value):
            if status in ("diverged", "preempted"):
                why = f"{status} ({failure})" if failure else str(status)
            elif failure:
                why = failure
            elif not summary:
                why = "it wrote no metrics.json"
            elif status != "completed":
                why = f"it ended with status {status!r}"
            else:
                why = f"its metrics.json has no finite {objective_metric(metric, summary)}"
            print(
                f"dtrain: trial #{num} ({shown}) failed: {why}; scored as the worst value ({worst})",
                file=sys.stderr,
                flush=True,
            )
            return worst
        print(f"dtrain: trial #{num} done: {objective_metric(metric, summary)}={value:.6g}", flush=True)
        return value

    def _elastic_launch(self, trial_dir: str, log_dir: str) -> Any:
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(
            min_nodes=self.min_nodes,
            max_nodes=self.max_nodes,
            nproc_per_node=self.nproc_per_node,
            run_id=rendezvous_id(trial_dir),
            rdzv_backend=self.rdzv_backend,
            rdzv_endpoint=self.rdzv_endpoint,
            rdzv_configs=dict(self.rdzv_configs),
            max_restarts=self.max_restarts,
            monitor_interval=self.monitor_interval,
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        )
        return elastic_launch(config, entrypoint=sys.executable)

    @contextlib.contextmanager
    def _log_dir(self) -> Iterator[str]:
        if self.log_dir:
            yield self.log_dir
            return
        with tempfile.TemporaryDirectory(prefix="dtrain_torchelastic_") as tmp:
            yield tmp


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """torchrun's ``--nnodes``: ``N`` or ``MIN:MAX``, as (min, max); a HydraException for anything else."""
    parts = str(nnodes).split(":")
    try:
        low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        low = high = 0
    if len(parts) > 2 or not 0 < low <= high:
        raise HydraException(f"hydra.launcher.nnodes={nnodes!r} must be N or MIN:MAX with 0 < MIN <= MAX")
    return low, high


def _check_settings(launcher: TorchrunLauncher) -> None:
    if launcher.nproc_per_node < 1:
        raise HydraException(f"hydra.launcher.nproc_per_node={launcher.nproc_per_node} must be at least 1")
    if launcher.max_restarts < 0:
        raise HydraException(f"hydra.launcher.max_restarts={launcher.max_restarts} must be 0 or more")
    if launcher.max_nodes > 1 and launcher.rdzv_endpoint.split(":")[-1] == "0":
        raise HydraException(
            "hydra.launcher.nnodes above 1 needs hydra.launcher.rdzv_endpoint=HOST:PORT, an address every node "
            "reaches (a free local port, :0, only serves one node)"
        )


def _sweep_only(key: str) -> bool:
    """Whether a Hydra override's key is one of SWEEP_ONLY or inside one (``hydra/sweeper/sampler`` too)."""
    return any(key == k or key.startswith((k + ".", k + "/")) for k in SWEEP_ONLY)


def quote_value(value: str) -> str:
    """``value`` as a Hydra override value: as it is when plain, else single-quoted with quotes escaped."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rendezvous_id(trial_dir: str) -> str:
    """The trial's rendezvous id: distinct between trials and sweeps, and the same on every node that runs
    the same sweep into the same ``hydra.sweep.dir`` (so a multi-node trial's agents meet)."""
    return "trial-" + hashlib.sha1(trial_dir.encode()).hexdigest()[:16]


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
        return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@contextlib.contextmanager
def _agent_scope(nproc_per_node: int) -> Iterator[None]:
    """What running the elastic agent in this process changes, undone after each trial.

    The agent installs signal handlers that raise in whatever this process does next, and sets
    environment variables that its next workers would inherit; torchrun would also give each worker
    one OpenMP thread when the user set none. The agent's own log lines about a failed trial are
    hidden unless the user sets LOGLEVEL (torchrun's switch for them): the launcher reports the
    failure in one line. HYDRA_FULL_ERROR is set by dtrain's own entry point while the sweep runs
    (to catch Hydra's errors itself): a trial sees the user's own setting instead.
    """
    saved_env = dict(os.environ)
    saved_disable = logging.root.manager.disable
    if not os.environ.get("LOGLEVEL"):  # the agent's log lines repeat what the launcher says in one line
        logging.disable(logging.ERROR)
    saved_handlers = {}
    for name in AGENT_SIGNALS:
        signum = getattr(signal, name)
        saved_handlers[signum] = signal.getsignal(signum)
    if nproc_per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    user_wants_tracebacks = _user_wants_tracebacks()
    if user_wants_tracebacks is not None:
        if user_wants_tracebacks:
            os.environ["HYDRA_FULL_ERROR"] = "1"
        else:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    try:
        yield
    finally:
        logging.disable(saved_disable)
        for signum, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        os.environ.clear()
        os.environ.update(saved_env)


def _user_wants_tracebacks() -> bool | None:
    """dtrain's entry point records whether the user asked for tracebacks (``python -m dtrain`` runs it
    as ``__main__``, the console script imports it as ``dtrain.__main__``); None outside dtrain."""
    for name in ("__main__", "dtrain.__main__"):
        value = getattr(sys.modules.get(name), "SHOW_TRACEBACKS", None)
        if isinstance(value, bool):
            return value
    return None
