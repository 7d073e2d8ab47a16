"""The schema: every config group composes, and bad values stop the run with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dtrain import compose as entry
from dtrain import config as C
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


# Each section checks its own fields, with the message that names the key and the value.
@pytest.mark.parametrize(
    ("section", "message"),
    [
        (C.PolynomialConfig(degree=0), "model.degree=0 must be at least 1"),
        (C.PolynomialConfig(init_scale=-1.0), "model.init_scale=-1.0 must be a non-negative number"),
        (C.MLPConfig(hidden=[8, 0]), "model.hidden=[8, 0] must hold positive sizes"),
        (C.MLPConfig(width=0), "model.width=0 must be a positive number or null"),
        (C.MLPConfig(dropout=1.5), "model.dropout=1.5 must be in [0, 1)"),
        (C.GraphModelConfig(graph="cnn"), "model.graph='cnn' is not one of: polynomial, mlp"),
        (C.GraphModelConfig(activation="gelu"), "model.activation='gelu' is not one of: relu, tanh, sigmoid"),
        (C.Poly2dConfig(val_fraction=1.0), "data.val_fraction=1.0 must be in [0, 1)"),
        (C.Poly2dConfig(grid_size=1), "data.grid_size=1 must be at least 2"),
        (C.Poly2dConfig(coefficients=[1.0]), "data.coefficients must hold 5 values (c0..c4)"),
        (C.Poly2dConfig(low=1.0, high=1.0), "data.low=1.0 must be below data.high=1.0"),
        (C.Poly2dConfig(noise=-0.1), "data.noise=-0.1 must be a non-negative number"),
        (
            C.Poly1dConfig(degree=2, coefficients=[1.0, 2.0]),
            "data.coefficients has 2 values; data.degree=2 needs 3 (k0..k2)",
        ),
        (C.Poly1dConfig(num_points=0), "data.num_points=0 must be a positive number"),
        (C.SineConfig(low=-10.0), "data ranges must nest: outer_low <= low < high <= outer_high"),
        (C.SineConfig(outer_fraction=1.0), "data.outer_fraction=1.0 must be in [0, 1)"),
        (C.MoonsConfig(num_points=0), "data.num_points=0 must be a positive number"),
        (
            C.FileDataConfig(path="x.csv", task="ranking"),
            "data.task='ranking' is not one of: regression, classification",
        ),
        (C.OptimConfig(name="lion"), "optim.name='lion' is not one of: sgd, adam, adamw, adagrad, rmsprop"),
        (C.OptimConfig(lr=-1.0), "optim.lr=-1.0 must be a positive number"),
        (C.OptimConfig(betas=[0.9]), "optim.betas=[0.9] must hold two values in [0, 1)"),
        (C.OptimConfig(alpha=1.5), "optim.alpha=1.5 must be in [0, 1]"),
        (
            C.OptimConfig(nesterov=True),
            "optim.nesterov=true needs optim.momentum > 0 (Nesterov momentum without momentum is undefined)",
        ),
        (C.ScheduleConfig(name="linear"), "schedule.name='linear' is not one of: constant, exp_decay, step, cosine"),
        (C.ScheduleConfig(decay=0.0), "schedule.decay=0.0 must be in (0, 1]"),
        (C.ScheduleConfig(step_size=0), "schedule.step_size=0 must be a positive number"),
        (C.TrainerConfig(max_epochs=0), "trainer.max_epochs=0 must be a positive number"),
        (C.TrainerConfig(batch_size=0), "trainer.batch_size=0 must be a positive number or null"),
        (C.TrainerConfig(precision="fp16"), "trainer.precision='fp16' is not one of: float32, float64, bf16-mixed"),
        (C.TrainerConfig(on_nonfinite="retry"), "trainer.on_nonfinite='retry' is not one of: stop, skip"),
        (C.DistConfig(backend="mpi"), "dist.backend='mpi' is not one of: auto, nccl, gloo"),
        (C.DistConfig(timeout_s=0.0), "dist.timeout_s=0.0 must be a positive number"),
        (C.CheckpointConfig(keep_last=0), "checkpoint.keep_last=0 must be a positive number"),
        (
            C.CheckpointConfig(allow_changes=["model"]),
            "checkpoint.allow_changes: 'model' cannot change on resume; these can: "
            + ", ".join(C.CHANGEABLE_ON_RESUME),
        ),
        (C.FaultConfig(kind="boom"), "fault.kind='boom' is not one of: none, kill, exit, hang, nan"),
        (C.FaultConfig(rank=-1), "fault.rank=-1 must be a non-negative number"),
        (C.ObjectiveConfig(mode="best"), "objective.mode='best' is not one of: min, max"),
        (
            C.ObjectiveConfig(metric="loss"),
            "objective.metric='loss' must be auto or a metric tag such as val/loss or val/accuracy",
        ),
        (C.PopulationConfig(size=0), "population.size=0 must be at least 1"),
    ],
)
def test_each_section_checks_its_own_fields(section: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        section.check()  # type: ignore[attr-defined]
    assert str(info.value) == message


def test_every_section_default_passes_its_own_check() -> None:
    for schema in (*C.MODELS.values(), *C.DATASETS.values(), C.OptimConfig, C.ScheduleConfig, C.TrainerConfig):
        schema().check()
    for schema in (C.DistConfig, C.CheckpointConfig, C.FaultConfig, C.ObjectiveConfig, C.PopulationConfig):
        schema().check()


def test_schedule_floor_is_checked_against_the_rate_it_is_given() -> None:
    C.ScheduleConfig(min_lr=1.0).check()  # alone, the schedule knows no rate
    with pytest.raises(ConfigError) as info:
        C.ScheduleConfig(min_lr=1.0).check(lr=0.01)
    assert str(info.value) == "schedule.min_lr=1 is above optim.lr=0.01; the floor would raise the rate"


def run_config(**sections: object) -> Config:
    parts: dict[str, object] = {
        "model": C.PolynomialConfig(),
        "data": C.Poly2dConfig(),
        "optim": C.OptimConfig(),
        "schedule": C.ScheduleConfig(),
    }
    return Config(**(parts | sections))  # type: ignore[arg-type]


# Where two values are bad, the one named is fixed by the order check() runs the sections and the rules
# between them in; these pin the cases where a rule between sections competes with a section's own.
@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"model": C.GraphModelConfig(), "trainer": C.TrainerConfig(precision="fp16")},
            "trainer.precision='fp16': model=graph trains in float32 or float64",
        ),
        (
            {
                "model": C.GraphModelConfig(),
                "trainer": C.TrainerConfig(precision="bf16-mixed"),
                "optim": C.OptimConfig(lr=-1.0),
            },
            "trainer.precision='bf16-mixed': model=graph trains in float32 or float64",
        ),
        (
            {"model": C.GraphModelConfig(graph="cnn"), "trainer": C.TrainerConfig(compile=True)},
            "model.graph='cnn' is not one of: polynomial, mlp",
        ),
        (
            {
                "model": C.GraphModelConfig(),
                "trainer": C.TrainerConfig(compile=True),
                "data": C.MoonsConfig(noise=-1.0),
            },
            "trainer.compile=true does not apply to model=graph (it is not a torch graph)",
        ),
        (
            {"schedule": C.ScheduleConfig(min_lr=1.0, step_size=0)},
            "schedule.min_lr=1 is above optim.lr=0.01; the floor would raise the rate",
        ),
        (
            {"schedule": C.ScheduleConfig(name="linear", min_lr=1.0)},
            "schedule.name='linear' is not one of: constant, exp_decay, step, cosine",
        ),
        (
            {"optim": C.OptimConfig(lr=-1.0), "schedule": C.ScheduleConfig(min_lr=0.5)},
            "optim.lr=-1.0 must be a positive number",
        ),
        (
            {"schedule": C.ScheduleConfig(min_lr=1.0), "trainer": C.TrainerConfig(max_epochs=0)},
            "schedule.min_lr=1 is above optim.lr=0.01; the floor would raise the rate",
        ),
        (
            {"seed": -1, "model": C.PolynomialConfig(degree=0)},
            "seed=-1 must be in [0, 2^63)",
        ),
        (
            {"resume": " ", "population": C.PopulationConfig(size=0), "checkpoint": C.CheckpointConfig(keep_last=0)},
            "checkpoint.keep_last=0 must be a positive number",
        ),
        (
            {"resume": " ", "population": C.PopulationConfig(size=0)},
            "resume='' is empty; use auto, never, or a checkpoint path",
        ),
    ],
)
def test_check_names_the_same_bad_value_first(sections: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        C.check(run_config(**sections))
    assert str(info.value) == message
