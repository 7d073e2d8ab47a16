"""Sweeps: the torchrun launcher (each trial its own torchrun job), Optuna driving trials, the presets."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dtrain.config import register_configs
from hydra_plugins.dtrain_torchrun_launcher.torchrun_launcher import (
    TorchrunLauncher,
    parse_nnodes,
    quote_value,
    rendezvous_id,
)
from tests.conftest import REPO, launch

# The trials' own settings, from a config directory of the test's own: the launcher must forward
# --config-dir to every trial, or the trials cannot compose experiment=tiny_sweep and fail.
TINY_SWEEP = """\
# @package _global_
defaults:
  - override /model: mlp
  - override /data: sine
  - override /optim: adam
model:
  hidden: [8, 8]
data:
  num_points: 400
trainer:
  batch_size: 32
  max_epochs: 1
  precision: float64
  progress: "off"
"""
TRIAL_LRS = ("0.001", "0.01", "-1")  # the last one is a bad value: that trial fails at start-up


def conf_dir() -> str:
    return str(REPO / "conf")


def trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def hparams(run_dir: Path) -> dict[str, object]:
    """The hyperparameters of the run's HParams session, as TensorBoard's HParams dashboard reads them."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in info.hparams.items()}


# ---------------------------------------------------------------------------------------------
# hydra/launcher=torchrun: a real sweep of 2-rank trials, Optuna's grid over three learning rates


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("torchrun_sweep")
    (root / "conf" / "experiment").mkdir(parents=True)
    (root / "conf" / "experiment" / "tiny_sweep.yaml").write_text(TINY_SWEEP)
    sweep_dir = root / "sweep"
    proc = launch(
        "-m",
        "--config-dir",
        str(root / "conf"),
        "experiment=tiny_sweep",
        "hydra/launcher=torchrun",
        "hydra.launcher.nproc_per_node=2",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",  # every value once, so Optuna's best must be the best trial's
        f"optim.lr=choice({','.join(TRIAL_LRS)})",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=300,
    )
    return proc, sweep_dir


@pytest.mark.multiprocess
def test_torchrun_trials_run_on_two_ranks_each_in_its_own_directory(torchrun_sweep) -> None:
    proc, sweep_dir = torchrun_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = trial_dirs(sweep_dir)
    # The failed trial's directory is gone (it wrote nothing); the others are one directory each.
    assert len(dirs) == 2, dirs
    lrs = sorted(run_config(d)["optim"]["lr"] for d in dirs)
    assert lrs == [0.001, 0.01]
    for d in dirs:
        m = metrics(d)
        assert m["world_size"] == 2 and m["status"] == "completed"
        assert (d / "model.pt").is_file() and (d / "logs" / "rank1.log").is_file()
        # The trial's own hyperparameters in its own TensorBoard HParams session.
        assert hparams(d)["optim.lr"] == pytest.approx(run_config(d)["optim"]["lr"])
        assert hparams(d)["model.name"] == "mlp"  # the forwarded --config-dir's experiment applied
    # The per-trial line the launcher prints names the objective it read from the trial's metrics.json.
    done = dict(re.findall(r"trial #(\d+) done: val/loss=(\S+)", proc.stdout))
    assert len(done) == 2
    for d in dirs:
        assert float(done[d.name]) == pytest.approx(metrics(d)["val/loss"], rel=1e-5)


@pytest.mark.multiprocess
def test_torchrun_objectives_reach_optuna_and_a_failed_trial_scores_worst(torchrun_sweep) -> None:
    proc, sweep_dir = torchrun_sweep
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = min(trial_dirs(sweep_dir), key=lambda d: metrics(d)["val/loss"])
    assert results["best_value"] == pytest.approx(metrics(best)["val/loss"], rel=1e-12)
    assert results["best_params"]["optim.lr"] == pytest.approx(run_config(best)["optim"]["lr"])
    # The bad trial: the trial's own one-line error once (rank 0), the launcher's one line, no traceback.
    assert proc.stderr.count("dtrain: error: optim.lr=-1.0 must be a positive number") == 1
    failed = [line for line in proc.stderr.splitlines() if " failed: " in line]
    assert len(failed) == 1, proc.stderr[-3000:]
    # Which rank torchrun names depends on which exited first (both exit 2).
    assert "optim.lr=-1" in failed[0] and re.search(r"rank \d exited with status 2", failed[0])
    assert failed[0].endswith("scored as the worst value (inf)")
    assert "Traceback" not in proc.stderr
    assert "exitcode" not in proc.stderr  # torch's agent log lines are left to LOGLEVEL


def test_the_launcher_is_a_discovered_hydra_plugin_registered_as_torchrun() -> None:
    # Hydra's scan executes the plugin modules itself (the class objects differ from ours): compare names.
    found = {f"{cls.__module__}.{cls.__name__}" for cls in Plugins.instance().discover(Launcher)}
    assert "hydra_plugins.dtrain_torchrun_launcher.torchrun_launcher.TorchrunLauncher" in found
    node = ConfigStore.instance().load("hydra/launcher/torchrun.yaml").node
    assert node._target_ == "hydra_plugins.dtrain_torchrun_launcher.torchrun_launcher.TorchrunLauncher"
    assert (node.nproc_per_node, node.nnodes, node.max_restarts, node.rdzv_endpoint) == (2, "1", 0, "localhost:0")


def test_the_launcher_refuses_to_run_a_sweep_inside_torchrun_or_srun(monkeypatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with pytest.raises(HydraException, match="runs trials, not ranks"):
        TorchrunLauncher().launch([["optim.lr=0.1"]], initial_job_idx=0)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HydraException, match="runs trials, not ranks"):
        TorchrunLauncher().launch([["optim.lr=0.1"]], initial_job_idx=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nproc_per_node": 0}, "nproc_per_node=0 must be at least 1"),
        ({"max_restarts": -1}, "max_restarts=-1 must be 0 or more"),
        ({"nnodes": "2"}, "nnodes above 1 needs hydra.launcher.rdzv_endpoint=HOST:PORT"),
        ({"nnodes": "3:2"}, "nnodes='3:2' must be N or MIN:MAX"),
        ({"nnodes": "two"}, "nnodes='two' must be N or MIN:MAX"),
    ],
)
def test_bad_launcher_settings_are_one_line_errors(settings: dict, message: str) -> None:
    with pytest.raises(HydraException) as info:
        TorchrunLauncher(**settings).setup(hydra_context=None, task_function=None, config=None)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_launcher_helpers() -> None:
    assert parse_nnodes("1") == (1, 1) and parse_nnodes("1:4") == (1, 4)
    launcher = TorchrunLauncher(nnodes="2", rdzv_endpoint="head:29400")
    launcher.setup(hydra_context=None, task_function=None, config=None)
    assert (launcher.min_nodes, launcher.max_nodes) == (2, 2)
    assert quote_value("/tmp/sweep/0") == "/tmp/sweep/0"
    assert quote_value("/tmp/my sweep/it's") == "'/tmp/my sweep/it\\'s'"
    launcher._claim("/s/0", 0)
    launcher._claim("/s/0", 0)  # the same trial again (a resumed sweep) is fine; another trial is not
    with pytest.raises(HydraException, match=r"trials #0 and #1 would share the run directory /s/0"):
        launcher._claim("/s/0", 1)
    # The same trial directory gives the same id (every node of a trial agrees); another gives another.
    assert rendezvous_id("/s/0") == rendezvous_id("/s/0") != rendezvous_id("/s/1")


# ---------------------------------------------------------------------------------------------
# experiment=tune_mlp: Optuna over lr, weight decay and width (a real search, trials in this process)


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path_factory.mktemp("optuna") / "sweep"
    proc = launch(
        "-m",
        "experiment=tune_mlp",
        "hydra.sweeper.n_trials=3",
        "data.num_points=400",
        "trainer.batch_size=64",
        "trainer.max_epochs=2",
        "trainer.progress=off",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return proc, sweep_dir


def test_optuna_best_value_is_the_best_trials_objective(optuna_sweep) -> None:
    proc, sweep_dir = optuna_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = trial_dirs(sweep_dir)
    assert len(dirs) == 3
    values = {d: metrics(d)["val/loss"] for d in dirs}  # objective.metric=auto: val/loss
    assert all(math.isfinite(v) for v in values.values())
    best = min(values, key=values.__getitem__)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(values[best], rel=1e-12)
    cfg = run_config(best)
    assert results["best_params"]["optim.lr"] == pytest.approx(cfg["optim"]["lr"], rel=1e-12)
    assert results["best_params"]["optim.weight_decay"] == pytest.approx(cfg["optim"]["weight_decay"], rel=1e-12)
    assert results["best_params"]["model.width"] == cfg["model"]["width"]


def test_optuna_trials_had_different_parameters_inside_the_search_space(optuna_sweep) -> None:
    _, sweep_dir = optuna_sweep
    seen = set()
    for d in trial_dirs(sweep_dir):
        cfg = run_config(d)
        lr, wd, width = cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["model"]["width"]
        assert 1e-4 <= lr <= 3e-1 and 0.0 <= wd <= 0.1 and width in (16, 32, 64, 128)
        assert cfg["model"]["name"] == "mlp" and cfg["optim"]["name"] == "adamw"
        assert metrics(d)["world_size"] == 1
        seen.add((lr, wd, width))
    assert len(seen) == 3


def test_tune_mlp_composes_with_the_torchrun_launcher() -> None:
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tune_mlp", "hydra/launcher=torchrun"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("TorchrunLauncher")
    assert cfg.hydra.launcher.nproc_per_node == 2
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "model.width"}
    assert "log" in sweeper.params["optim.lr"]
    assert cfg.objective.mode == "min" and cfg.model.name == "mlp" and cfg.trainer.figures is False
