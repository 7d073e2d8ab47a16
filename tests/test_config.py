"""The schema: every config group composes, and bad values stop the run with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dtrain.__main__ as entry
from dtrain.config import Config, ConfigError, MLPConfig, PolynomialConfig
from tests.conftest import REPO, cli_env, run_dtrain

CONF = Path(entry.config_dir())


def composed(*overrides: str) -> Config:
    return entry.compose_config(list(overrides))


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_tree_has_the_promised_groups() -> None:
    assert option_names("model") == ["graph", "mlp", "polynomial"]
    assert option_names("data") == ["file", "moons", "poly1d", "poly2d", "sine"]
    assert option_names("optim") == ["adagrad", "adam", "adamw", "rmsprop", "sgd"]
    assert option_names("schedule") == ["constant", "cosine", "exp_decay", "step", "warmup_cosine"]
    assert option_names("trainer") == ["default"]
    assert {"seed_good", "seed_bad", "poly2d", "diverge"} <= set(option_names("experiment"))


@pytest.mark.parametrize(
    "group",
    ["model", "data", "optim", "schedule", "experiment"],
)
def test_every_option_composes_and_validates(group: str) -> None:
    for name in option_names(group):
        extra = ["data.path=x.csv"] if (group, name) == ("data", "file") else []
        config = composed(f"{group}={name}", *extra)
        assert isinstance(config, Config)


def test_overrides_land_typed() -> None:
    config = composed("model=mlp", "model.hidden=[32,16]", "optim=adam", "optim.lr=3e-4", "seed=7")
    assert isinstance(config.model, MLPConfig) and config.model.hidden == [32, 16]
    assert config.optim.name == "adam" and config.optim.lr == pytest.approx(3e-4)
    assert config.seed == 7
    assert isinstance(composed().model, PolynomialConfig)


def test_warmup_cosine_is_cosine_with_warmup() -> None:
    schedule = composed("schedule=warmup_cosine").schedule
    assert schedule.name == "cosine" and schedule.warmup > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], "optim.lr=-1.0 must be a positive number"),
        (["optim.lr=0"], "optim.lr=0.0 must be a positive number"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be a positive number or null"),
        (["model.degree=0"], "model.degree=0 must be at least 1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
        (["trainer.precision=fp16"], "trainer.precision='fp16' is not one of: float32, float64, bf16-mixed"),
        (["+model.extra=1"], "unknown key 'model.extra'"),
        (["+trainer.extra=1"], "unknown key 'trainer.extra'"),
        (["+extra=1"], "unknown config key 'extra'"),
        (["model=mlp", "model.activation=swish"], "model.activation='swish' is not one of"),
        (["model=mlp", "model.dropout=1.5"], "model.dropout=1.5"),
        (["data=file"], "data.path is required"),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0 must be in [0, 1)"),
        (["data=poly1d", "data.degree=2", "data.coefficients=[1,2]"], "data.degree=2 needs 3"),
        (["optim.nesterov=true"], "optim.nesterov=true needs optim.momentum > 0"),
        (["dist.backend=mpi"], "dist.backend='mpi' is not one of: auto, nccl, gloo"),
        (["model=graph", "model.graph=cnn"], "model.graph='cnn' is not one of: polynomial, mlp"),
        (["model=graph", "trainer.precision=bf16-mixed"], "model=graph trains in float32 or float64"),
        (["model=graph", "model.activation=gelu"], "model.activation='gelu' is not one of: relu, tanh, sigmoid"),
        (["optim=adam", "optim.lr=3e-4", "schedule=cosine", "schedule.min_lr=1e-3"], "schedule.min_lr=0.001 is above"),
        (["optim=adagrad", "optim.lr_decay=-1"], "optim.lr_decay=-1.0"),
        (["seed=-1"], "seed=-1 must be in [0, 2^63)"),
    ],
)
def test_impossible_values_are_one_line_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        composed(*overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], "dtrain: error: optim.lr=-1.0 must be a positive number"),
        (["model.nope=1"], "dtrain: error: Could not override 'model.nope'"),
        (["trainer.batch_size=abc"], "could not be converted to Integer"),
        (["optim=lion"], "available: adagrad, adam, adamw, rmsprop, sgd"),
        (["trainer.batch_size=100000"], "trainer.batch_size=100000 is larger than the training set (720 samples)"),
        (["data=file", "data.path=/no/such.csv"], "data.path='/no/such.csv': no such file"),
        (["data=moons"], "model=polynomial is a regression model"),
        (["model=[mlp,polynomial]"], "PolynomialConfig is not a subclass of MLPConfig"),
    ],
)
def test_cli_reports_bad_input_in_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    run = run_dtrain(tmp_path / "run", *overrides)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("dtrain: error: ") and message in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    env = cli_env() | {"HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dtrain", f"hydra.run.dir={tmp_path}", "optim.lr=-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_a_failed_run_overwrites_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious\n")
    run = run_dtrain(run_dir, "trainer.batch_size=100000")
    assert run.returncode == 2
    assert (run_dir / "config.yaml").read_text() == "precious\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
