"""Populations: members' values, the stacked models' gradients, equality with single runs, the CLI's outputs,
members split across ranks, and lr-find on the original surface."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dtrain.commands.lr_find import Trial, analyse
from dtrain.compose import compose_config as compose
from dtrain.config import Config, ConfigError, LossConfig
from dtrain.data import build_dataset
from dtrain.population.chunking import FUSING_MARGIN, chunk_candidates, pick_chunk
from dtrain.population.leaderboard import member_name
from dtrain.population.members import evenly_spaced, expand_members, member_values
from dtrain.population.run import build_stacked
from dtrain.run import train
from dtrain.train.objective import build_loss
from tests.conftest import assert_ok, launch, run_dtrain
from tests.tb import scalars


def compose_config(*overrides: str) -> Config:
    return compose(list(overrides))


# ---------------------------------------------------------------------------------------------
# Members' values


def test_lists_spaces_and_draws_give_each_member_its_values() -> None:
    values = member_values(
        compose_config(
            "population.size=4",
            "population.optim.lr=logspace:1e-3:1e-1",
            "population.optim.momentum=[0.0,0.5,0.9,0.95]",
            "population.optim.weight_decay=loguniform:1e-5:1e-2",
            "population.init_seed=each",
            "seed=10",
        )
    )
    assert [v["optim.lr"] for v in values] == pytest.approx([1e-3, 10 ** (-2 - 1 / 3), 10 ** (-1 - 2 / 3), 1e-1])
    assert [v["optim.momentum"] for v in values] == [0.0, 0.5, 0.9, 0.95]
    assert all(1e-5 <= v["optim.weight_decay"] <= 1e-2 for v in values)
    assert len({v["optim.weight_decay"] for v in values}) == 4
    assert [v["init_seed"] for v in values] == [10, 11, 12, 13]


def test_draws_follow_the_draw_seed() -> None:
    def draws(seed: int) -> list[float]:
        config = compose_config("population.size=3", "population.optim.lr=uniform:0:1", f"population.draw_seed={seed}")
        return [v["optim.lr"] for v in member_values(config)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_a_grid_has_one_member_per_combination_and_a_list_sets_the_size() -> None:
    grid = member_values(
        compose_config("population.grid=true", "population.optim.lr=[0.1,0.2]", "population.optim.momentum=[0,0.5,0.9]")
    )
    assert len(grid) == 6
    assert {(v["optim.lr"], v["optim.momentum"]) for v in grid} == {(lr, m) for lr in (0.1, 0.2) for m in (0, 0.5, 0.9)}
    assert len(member_values(compose_config("population.optim.lr=[0.1,0.2,0.3]"))) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["population.optim.lr=triangle:0:1", "population.size=2"], "is not a value list or range"),
        (["population.optim.lr=[0.1,0.2]", "population.size=3"], "has 2 values for population.size=3"),
        (["population.optim.lr=logspace:0:1", "population.size=2"], "needs LO and HI above 0"),
        (["population.optim.lr=[0.1,-0.2]"], "population member 1 (optim.lr=-0.2): optim.lr=-0.2 must be a positive"),
        (["population.grid=true", "population.optim.lr=uniform:0:1"], "random draws are not a grid axis"),
        (["population.size=2", "population.optim.lr=uniform:0:1:2"], "random draws take no count"),
        (["population.optim.lr=[a,b]"], "population.optim.lr: 'a' in ['a', 'b'] is not a number"),
        (["population.optim.lr=[0.1,true]"], "True in [0.1, True] is not a number"),
        (["population.optim.lr=[0.1,0.2]", "population.optim.weight_decay=[0,0,0]"], "lists disagree"),
        (["population.optim.lr=logspace:1e-3:1:2.5"], "the count N=2.5 must be a whole number"),
        (["optim=adam", "population.optim.momentum=[0.5,0.9]"], "optim=adam does not use optim.momentum"),
        (["population.schedule.decay=[0.9,0.99]"], "schedule=constant does not use schedule.decay"),
    ],
)
def test_bad_member_values_name_the_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        expand_members(compose_config(*overrides))
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Stacked models: every member's loss and gradient equal its own model's


@pytest.mark.parametrize(
    "model",
    [
        ("model=mlp", "model.hidden=[8,8]", "data=moons", "data.num_points=64"),
        ("model=polynomial", "data=poly2d", "data.grid_size=8"),
        ("model=graph", "model.graph=polynomial", "data=poly1d", "data.num_points=64"),
        ("model=graph", "model.graph=mlp", "model.hidden=[6]", "data=moons", "data.num_points=64"),
    ],
    ids=["mlp-classes", "polynomial", "graph-polynomial", "graph-mlp-classes"],
)
def test_stacked_losses_and_gradients_equal_each_members_own(model: tuple[str, ...]) -> None:
    config = compose_config(*model, "population.init_seed=[0,1,2,3,4]", "trainer.precision=float64")
    members = expand_members(config)
    data = build_dataset(config.data, config.seed).to(torch.device("cpu"), torch.float64)
    x, y = data.train.x, data.train.y
    stacked = build_stacked(members, data, torch.device("cpu"), torch.float64)
    from dtrain.models import build_initial_model

    for chunk in (5, 2, 1):
        stacked.chunk = chunk
        losses, grads = stacked.losses_and_grads(x, y)
        for i, member in enumerate(members):
            single = build_initial_model(member.config, data).to(torch.float64)
            single.zero_grad()
            if config.model.name == "graph":
                loss = single.loss_and_backward(x, y)
            else:
                loss = build_loss(LossConfig(), data.task).fn(single(x), y)
                loss.backward()
            assert losses[i].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-14)
            for k, (name, p) in enumerate(single.named_parameters()):
                assert stacked.names[k] == name
                torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-10, atol=1e-12)


def test_pick_chunk_times_doublings_and_keeps_the_fastest_by_a_margin() -> None:
    config = compose_config("model=mlp", "model.hidden=[8]", "population.size=8", "data=sine", "data.num_points=64")
    members = expand_members(config)
    data = build_dataset(config.data, config.seed).to(torch.device("cpu"), torch.float32)
    stacked = build_stacked(members, data, torch.device("cpu"), torch.float32)
    chunk, timings = pick_chunk(stacked, data.train.x, data.train.y, repeats=1)
    assert chunk_candidates(8) == [1, 2, 4, 8] and chunk_candidates(5) == [1, 2, 4, 5]
    assert set(timings) <= {8, 4, 2, 1} and 1 in timings
    fastest = min(timings, key=timings.__getitem__)
    assert chunk == (fastest if timings[fastest] <= (1 - FUSING_MARGIN) * timings[1] else 1) == stacked.chunk


# ---------------------------------------------------------------------------------------------
# A population equals its members trained alone


SMALL_MLP = (
    "model=mlp",
    "model.hidden=[8,8]",
    "data=sine",
    "data.num_points=200",
    "trainer.batch_size=40",
    "trainer.max_epochs=6",
    "trainer.log_every=7",
    "trainer.precision=float64",
    "trainer.progress=off",
    "trainer.figures=false",
    "schedule=cosine",
)


@pytest.mark.parametrize(
    "varied",
    [
        (
            "optim=sgd",
            "population.optim.lr=[0.05,0.1,0.2]",
            "population.optim.momentum=[0.0,0.9,0.5]",
            "population.optim.weight_decay=[0.0,1e-3,1e-2]",
            "population.trainer.clip_grad_norm=[1e9,0.5,0.05]",
        ),
        (
            "optim=adamw",
            "population.optim.lr=[1e-3,1e-2,3e-2]",
            "population.optim.beta1=[0.9,0.8,0.5]",
            "population.optim.weight_decay=[0.0,0.1,0.01]",
            "population.init_seed=[3,4,5]",
        ),
        (
            "optim=adam",
            "schedule=exp_decay",
            "schedule.interval=epoch",
            "schedule.decay=0.8",
            "trainer.clip_grad_value=0.05",
            "trainer.grad_accum_steps=2",
            "trainer.max_steps=21",
            "trainer.eval_every=5",
            "checkpoint.every_n_steps=4",
            "population.optim.lr=[1e-2,3e-2]",
            "population.schedule.min_lr=[1e-4,1e-3]",
        ),
    ],
    ids=["sgd-momentum-clipping", "adamw-seeds", "adam-epoch-schedule-value-clipping-accumulation"],
)
def test_each_member_equals_its_single_run(tmp_path: Path, varied: tuple[str, ...]) -> None:
    config = compose_config(*SMALL_MLP, *varied)
    results = train(config, tmp_path / "population").population
    assert results is not None
    for i, member in enumerate(expand_members(config)):
        single = train(member.config, tmp_path / f"single{i}")
        assert single.status == "completed"
        for tag in ("train/loss", "val/loss", "grad_norm/total", "lr"):
            assert results.metrics[i][tag] == pytest.approx(single.summary[tag], rel=1e-10), (i, tag)
        # Measured at the same steps: the member's TensorBoard run logs and evaluates where its single run does.
        member_scalars = scalars(tmp_path / "population" / "members" / member_name(i, len(results.status)))
        single_scalars = scalars(tmp_path / f"single{i}")
        for tag in ("train/loss", "val/loss"):
            assert [s for s, _ in member_scalars[tag]] == [s for s, _ in single_scalars[tag]], (i, tag)


def test_a_diverging_member_is_frozen_while_the_others_train_on(tmp_path: Path) -> None:
    overrides = ("data.val_fraction=0", "trainer.max_epochs=100", "trainer.precision=float64", "trainer.progress=off")
    config = compose_config(*overrides, "trainer.figures=false", "population.optim.lr=[0.01,100.0,0.1]")
    results = train(config, tmp_path / "population").population
    assert results is not None
    assert results.status == ["completed", "diverged", "completed"]
    assert results.steps[1] < 100 and math.isnan(results.metrics[1]["train/loss"])
    for i in (0, 2):
        single = train(expand_members(config)[i].config, tmp_path / f"single{i}")
        assert results.metrics[i]["train/loss"] == pytest.approx(single.summary["train/loss"], rel=1e-10)


def test_graph_population_equals_the_torch_population(tmp_path: Path) -> None:
    common = (*SMALL_MLP[2:], "model.hidden=[8,8]", "optim=adam", "population.optim.lr=[1e-3,1e-2]")
    torch_run = train(compose_config("model=mlp", "model.activation=tanh", *common), tmp_path / "torch")
    graph_run = train(compose_config("model=graph", "model.graph=mlp", *common), tmp_path / "graph")
    assert graph_run.population is not None and torch_run.population is not None
    for ours, theirs in zip(graph_run.population.metrics, torch_run.population.metrics, strict=True):
        assert ours["val/loss"] == pytest.approx(theirs["val/loss"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# The command line: leaderboard, TensorBoard runs with HParams, the best member's preset


@pytest.fixture(scope="module")
def population_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("population") / "run"
    run = run_dtrain(
        run_dir,
        "experiment=poly2d",
        "trainer.max_epochs=100",
        "population.optim.lr=logspace:1e-3:0.3:6",
    )
    return assert_ok(run)


def hparams_of(run_dir: Path) -> dict[str, float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return {k: v.number_value for k, v in data.session_start_info.hparams.items() if v.HasField("number_value")}


def test_the_leaderboard_ranks_members_by_the_objective(population_run) -> None:
    rows = list(csv.DictReader((population_run.run_dir / "population.csv").open()))
    assert len(rows) == 6
    completed = [r for r in rows if r["status"] == "completed"]
    losses = [float(r["objective"]) for r in completed]
    assert losses == sorted(losses)
    assert rows[-1]["status"] == "diverged" and float(rows[-1]["optim.lr"]) == pytest.approx(0.3)
    document = json.loads((population_run.run_dir / "population.json").read_text())
    assert document["best"]["member"] == int(rows[0]["member"])
    assert document["objective"] == {"metric": "train/loss", "mode": "min"}
    assert population_run.metrics["train/loss"] == pytest.approx(losses[0])
    assert "rerun best" in population_run.stdout


def test_each_member_has_its_own_tensorboard_run_with_hparams(population_run) -> None:
    from tests.tb import scalars

    rows = list(csv.DictReader((population_run.run_dir / "population.csv").open()))
    for row in rows[:2]:
        member_dir = population_run.run_dir / row["run"]
        assert hparams_of(member_dir)["optim.lr"] == pytest.approx(float(row["optim.lr"]))
        series = scalars(member_dir)
        assert series["train/loss"][-1][1] == pytest.approx(float(row["train/loss"]), rel=1e-6)
        assert series["hparam/train/loss"][-1][1] == pytest.approx(float(row["train/loss"]), rel=1e-6)
    assert "population/best_train_loss" in scalars(population_run.run_dir)


def test_the_best_members_preset_reruns_it_alone(population_run, tmp_path: Path) -> None:
    best = json.loads((population_run.run_dir / "population.json").read_text())["best"]
    proc = launch("--config-dir", str(population_run.run_dir), "experiment=best", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    alone = json.loads((tmp_path / "metrics.json").read_text())
    assert alone["train/loss"] == pytest.approx(best["train/loss"], rel=1e-5)


@pytest.mark.multiprocess
def test_members_split_across_ranks_give_the_one_process_leaderboard(tmp_path: Path) -> None:
    """Rank 1's two members both diverge early while rank 0's train on: every rank still enters every
    collective, and the leaderboard is the one-process one."""
    overrides = ("model=mlp", "model.hidden=[8]", "data=sine", "data.num_points=200", "optim=sgd",
                 "trainer.max_epochs=30", "trainer.precision=float64", "population.optim.lr=[1e-3,1e-2,0.1,1e3,1e4]",
                 "population.chunk=1")  # fmt: skip
    one = assert_ok(run_dtrain(tmp_path / "one", *overrides))
    two = assert_ok(run_dtrain(tmp_path / "two", *overrides, nproc=2))
    one_rows = json.loads((one.run_dir / "population.json").read_text())["members"]
    assert one_rows == json.loads((two.run_dir / "population.json").read_text())["members"]
    assert [row["status"] for row in one_rows] == ["completed"] * 3 + ["diverged"] * 2
    assert two.metrics["world_size"] == 2 and two.metrics["population_size"] == 5


# ---------------------------------------------------------------------------------------------
# lr-find


def test_analyse_finds_the_boundary_of_a_sorted_or_shuffled_sweep() -> None:
    trials = [Trial(lr, 10.0, min(10.0, 1 / lr), 1 / lr, "completed") for lr in (0.1, 0.2, 0.4)]
    trials += [Trial(0.8, 10.0, 5.0, 50.0, "completed"), Trial(1.6, 10.0, 5.0, math.nan, "diverged")]
    finding = analyse(list(reversed(trials)), rise=1.1, configured=0.1, hessian=None)
    assert (finding.largest_stable, finding.best, finding.diverges_at) == (0.4, 0.4, 0.8)
    assert finding.configured_loss == 10.0
    assert evenly_spaced(1e-3, 1e-1, 3, log=True) == pytest.approx([1e-3, 1e-2, 1e-1])


def test_lr_find_finds_the_stability_limit_of_the_surface(tmp_path: Path) -> None:
    """Plain gradient descent on the 30x30 surface: stable below 2 / 12.86 = 0.1555, and the original example's
    0.01 far below the best rate."""
    overrides = ("data.val_fraction=0", "optim.lr=0.01")
    proc = launch("lr-find", *overrides, "--members", "16", "--refine", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    finding = json.loads((tmp_path / "lr_find.json").read_text())["finding"]
    assert finding["hessian_lambda_max"] == pytest.approx(12.8615, abs=1e-3)
    limit = 2 / finding["hessian_lambda_max"]
    assert finding["largest_stable"] < limit < finding["diverges_at"]
    assert finding["diverges_at"] / finding["largest_stable"] < 1.01  # the refinement rounds narrow it
    assert finding["best"] > 5 * 0.01
    assert finding["configured"] == 0.01 and finding["configured_loss"] > finding["best_loss"]
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    assert "largest stable rate" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=bf16-mixed", "a population trains in float32 or float64"),
        ("trainer.compile=true", "does not apply to a population"),
        ("fault.kind=nan", "fault injection is for single runs"),
        ("trainer.on_nonfinite=skip", "a population freezes a member that goes non-finite"),
        ("objective.metric=val/los", "objective.metric='val/los' is not a metric of this run; it has: train/loss"),
    ],
)
def test_what_a_population_cannot_do_is_refused_before_training(tmp_path: Path, override: str, message: str) -> None:
    config = compose_config("population.optim.lr=[0.1,0.2]", override)
    with pytest.raises(ConfigError) as caught:
        train(config, tmp_path / "run")
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_population_whose_members_all_diverge_ends_diverged_without_a_preset(tmp_path: Path) -> None:
    config = compose_config("data.val_fraction=0", "trainer.precision=float64", "population.optim.lr=[100.0,200.0]")
    result = train(config, tmp_path / "run")
    assert result.status == "diverged" and result.population is not None
    assert result.population.status == ["diverged", "diverged"]
    assert result.population.steps[0] < 100  # stopped once no member trained, not at max_epochs
    assert not (tmp_path / "run" / "experiment").exists()
    assert json.loads((tmp_path / "run" / "population.json").read_text())["best"] is None


def test_population_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    proc = launch("optim=rmsprop", "population.optim.lr=[0.1,0.2]", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == "dtrain: error: optim=rmsprop: a population trains with sgd, adam, adamw"
