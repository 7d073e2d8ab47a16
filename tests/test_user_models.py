"""A user's own model, loss and metrics (defined in tests/user_models.py, outside the package), trained through
the real command line, and the trained model used again: every promise dtrain makes for its own models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dtrain
from tests.conftest import Run, assert_ok, main_in_process, run_dtrain
from tests.tb import scalars

TINY = "model._target_=tests.user_models.TinyNet"
# Moons with the user's module, two torchmetrics metrics, float64, mini-batches: 8 steps an epoch.
CLASSIFY = (TINY, "model.width=8", "data=moons", "data.num_points=500", "metrics=[accuracy,f1]")
CLASSIFY += ("trainer.batch_size=40", "trainer.precision=float64", "optim=adam", "optim.lr=0.02")
WATCHED = ("checkpoint.save_best=true", "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=0.01")


def state(run_dir: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, weights_only=True)["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol)


def one_line_refusal(run: Run, *fragments: str) -> None:
    """Exit 2, one ``dtrain: error:`` line naming the fragments, no traceback, nothing written."""
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not run.run_dir.exists() or not any(run.run_dir.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Under torchrun: DDP equals one process, metrics are reduced, early stopping agrees, predictions split rows


@pytest.mark.multiprocess
def test_a_user_module_under_ddp_equals_one_process_and_predicts_on_two_ranks(tmp_path: Path) -> None:
    args = (*CLASSIFY, *WATCHED, "trainer.max_epochs=40")
    one = assert_ok(run_dtrain(tmp_path / "one", *args))
    two = assert_ok(run_dtrain(tmp_path / "two", *args, nproc=2))
    # Same global batch, float64: the same weights, the same best model, stopped early at the same step.
    assert_same_state(state(two.run_dir), state(one.run_dir), tol=1e-10)
    assert_same_state(state(two.run_dir, "model_best.pt"), state(one.run_dir, "model_best.pt"), tol=1e-10)
    assert one.metrics["stopped_early"] and 0 < one.metrics["steps"] < 40 * 10
    assert two.metrics["steps"] == one.metrics["steps"] and two.metrics["best_step"] == one.metrics["best_step"]
    # torchmetrics' f1 and dtrain's counted accuracy, reduced across the two ranks' disjoint shards.
    for tag in ("val/accuracy", "val/f1", "val/loss"):
        assert two.metrics[tag] == pytest.approx(one.metrics[tag], abs=1e-9)
    assert one.metrics["val/accuracy"] > 0.8
    # Per-layer gradient norms are named after the user's module's parameters, in TensorBoard and metrics.json.
    assert {"grad_norm/encoder.weight", "grad_norm/head.bias"} <= set(scalars(two.run_dir))
    # The 2-rank run's config records the user's class, so the model can be rebuilt without dtrain's classes.
    assert "_target_: tests.user_models.TinyNet" in (two.run_dir / "config.yaml").read_text()

    from tests.conftest import launch

    out_two, out_one = tmp_path / "two.npz", tmp_path / "one.npz"
    proc = launch("predict", str(two.run_dir), "--best", "--out", str(out_two), nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, _, err = main_in_process("predict", str(two.run_dir), "--best", "--out", str(out_one))
    assert code == 0, err
    with np.load(out_two) as split, np.load(out_one) as whole:
        assert split["class"].shape == (100,) and split["probabilities"].shape == (100, 2)
        np.testing.assert_array_equal(split["class"], whole["class"])
        np.testing.assert_allclose(split["probabilities"], whole["probabilities"], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Resume, the best model and early stopping


def test_a_crashed_run_with_a_best_model_and_early_stopping_resumes_exactly(tmp_path: Path) -> None:
    args = (*CLASSIFY, *WATCHED, "trainer.max_epochs=40", "checkpoint.every_n_steps=12")
    whole = assert_ok(run_dtrain(tmp_path / "whole", *args))
    crashed = run_dtrain(tmp_path / "run", *args, "fault.kind=exit", "fault.step=30")
    assert crashed.returncode == 1
    resumed = assert_ok(run_dtrain(tmp_path / "run", *args))
    assert "resumed from" in resumed.stdout
    assert_same_state(state(resumed.run_dir), state(whole.run_dir))
    assert_same_state(state(resumed.run_dir, "model_best.pt"), state(whole.run_dir, "model_best.pt"))
    for key in ("steps", "best_step", "best_value", "stopped_early", "val/f1"):
        assert resumed.metrics[key] == whole.metrics[key], key
    # The run stopped early: the same command again trains no further.
    again = assert_ok(run_dtrain(tmp_path / "run", *args))
    assert "\nstep " not in again.stdout and again.metrics["steps"] == whole.metrics["steps"]


def test_the_best_model_is_the_one_of_the_best_evaluation(tmp_path: Path) -> None:
    # A rate too high for Adam here: validation gets worse after its best, and the final model is not the best.
    args = (TINY, "data=sine", "data.num_points=300", "trainer.batch_size=20", "trainer.max_epochs=12")
    args += ("optim=adam", "optim.lr=0.3", "checkpoint.save_best=true", "trainer.precision=float64")
    run = assert_ok(run_dtrain(tmp_path / "run", *args))
    best = torch.load(run.run_dir / "model_best.pt", weights_only=True)
    val_losses = scalars(run.run_dir)["val/loss"]
    best_step, best_value = min(val_losses, key=lambda sv: sv[1])
    assert best["step"] == best_step == run.metrics["best_step"]
    assert best["metrics"]["val/loss"] == pytest.approx(best_value) == run.metrics["best_value"]
    assert run.metrics["val/loss"] > best_value  # the final model is worse: keeping the best mattered
    # load(best=True) gives that model: its validation loss, recomputed here, is the logged best.
    model = dtrain.load(run.run_dir, best=True)
    from dtrain.compose import compose_config
    from dtrain.data import build_dataset

    val = build_dataset(compose_config(list(args)).data, 0).val[""]
    with torch.no_grad():
        recomputed = torch.nn.functional.mse_loss(model(val.x.double()), val.y.double()).item()
    assert recomputed == pytest.approx(run.metrics["best_value"], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The other promises: gradcheck, populations, lr-find, sweeps


def test_gradcheck_checks_a_user_module_against_finite_differences() -> None:
    code, out, err = main_in_process("gradcheck", TINY, "model.width=4", "data=moons")
    assert code == 0, out + err
    assert "model=tests.user_models.TinyNet" in out and "encoder.weight" in out and "gradcheck passed" in out


def test_a_population_stacks_a_user_module_and_refuses_one_with_buffers(tmp_path: Path) -> None:
    args = ("data=sine", "data.num_points=200", "trainer.max_epochs=3", "population.optim.lr=[0.01,0.1]")
    run = assert_ok(run_dtrain(tmp_path / "pop", TINY, "model.width=4", *args))
    assert len(json.loads((run.run_dir / "population.json").read_text())["members"]) == 2
    refused = run_dtrain(tmp_path / "bn", "model._target_=tests.user_models.BatchNormNet", *args)
    one_line_refusal(refused, "cannot stack", "running_mean")


def test_lr_find_runs_on_a_user_module(tmp_path: Path) -> None:
    code, out, err = main_in_process(
        "lr-find", TINY, "model.width=4", "data=sine", "data.num_points=200", "--members", "4", "--refine", "0",
        "--steps", "20", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, out + err
    assert "stable" in out.lower()


def test_a_sweep_over_a_user_modules_arguments(tmp_path: Path) -> None:
    code, out, err = main_in_process(
        "-m", TINY, "model.width=2,6", "data=sine", "data.num_points=100", "trainer.max_epochs=2",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert code == 0, out + err
    configs = sorted((tmp_path).glob("*/config.yaml"))
    assert [("width: 2" in c.read_text(), "width: 6" in c.read_text()) for c in configs] == [
        (True, False),
        (False, True),
    ]


@pytest.mark.parametrize("how", ["searchpath", "config-dir"])
def test_an_option_file_of_the_users_own(tmp_path: Path, how: str) -> None:
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my_net.yaml").write_text("_target_: tests.user_models.make_tiny\nwidth: 3\n")
    args = ("model=my_net", "model.width=5", "data=sine", "data.num_points=100", "trainer.max_epochs=1")
    if how == "searchpath":
        assert_ok(run_dtrain(tmp_path / "run", f"hydra.searchpath=[file://{conf}]", *args))
    else:  # Hydra's flags come before the overrides
        code, _, err = main_in_process("--config-dir", str(conf), f"hydra.run.dir={tmp_path / 'run'}", *args)
        assert code == 0, err
    assert state(tmp_path / "run")["encoder.weight"].shape == (5, 1)  # the factory got width=5, num_inputs=1


# ---------------------------------------------------------------------------------------------------------------
# Losses and metrics


@pytest.mark.parametrize(
    ("data", "loss"),
    [
        ("sine", "loss=l1"),
        ("sine", "loss=huber"),
        ("sine", "loss._target_=tests.user_models.scaled_mse"),
        ("sine", "loss._target_=torch.nn.SmoothL1Loss"),
        ("moons", "loss=bce_with_logits"),
    ],
)
def test_each_loss_trains(tmp_path: Path, data: str, loss: str) -> None:
    metrics = "metrics=[accuracy,f1,auroc]" if data == "moons" else "metrics=[mae,r2]"
    run = assert_ok(run_dtrain(tmp_path / "run", TINY, f"data={data}", loss, metrics, "trainer.max_epochs=30"))
    first, last = scalars(run.run_dir)["train/loss"][0][1], run.metrics["train/loss"]
    assert last < first
    if data == "moons":
        assert run.metrics["val/accuracy"] > 0.75 and 0.5 < run.metrics["val/auroc"] <= 1
        assert torch.load(run.run_dir / "model.pt", weights_only=True)["sizes"]["num_outputs"] == 1  # one logit
    else:
        assert run.metrics["val/mae"] > 0 and run.metrics["val/r2"] < 1


def test_a_metric_object_by_target_and_the_objective_naming_it(tmp_path: Path) -> None:
    target = "metrics=[{_target_:torchmetrics.classification.MulticlassCohenKappa,name:kappa}]"
    run = assert_ok(run_dtrain(tmp_path / "run", TINY, "data=moons", target, "objective.metric=val/kappa"))
    assert -1 <= run.metrics["val/kappa"] <= 1 and "val/kappa" in scalars(run.run_dir)


# ---------------------------------------------------------------------------------------------------------------
# Using a trained model


def test_load_and_predict_a_built_in_model(tmp_path: Path) -> None:
    run = assert_ok(run_dtrain(tmp_path / "run", "trainer.max_epochs=5", "trainer.precision=float64"))
    # What was loaded, said at start-up (issue 14's summary).
    assert "data: poly2d (generated): 720 train / 180 val rows, 2 features, regression, target in [" in run.stdout
    model = dtrain.load(run.run_dir)
    assert type(model).__name__ == "Polynomial" and not model.training
    x = torch.tensor([[0.5, -1.0], [1.0, 1.0]], dtype=torch.float64)
    np.savez(tmp_path / "new.npz", x=x.numpy())
    out = tmp_path / "p.csv"
    code, _, err = main_in_process("predict", str(run.run_dir), f"data.path={tmp_path / 'new.npz'}", "--out", str(out))
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction" and len(lines) == 3
    with torch.no_grad():
        expected = model(x).reshape(-1).tolist()
    assert [float(v) for v in lines[1:]] == pytest.approx(expected, rel=1e-12)
    # A .csv without the target column, into a .npz.
    (tmp_path / "new.csv").write_text("a,b\n0.5,-1.0\n1.0,1.0\n")
    code, _, err = main_in_process(
        "predict", str(run.run_dir), f"data.path={tmp_path / 'new.csv'}", "--out", f"{out}.npz"
    )
    assert code == 0, err
    with np.load(f"{out}.npz") as predicted:
        assert predicted["prediction"].reshape(-1).tolist() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the value, exit 2, nothing written

BAD_INPUT = [
    (("model._target_=tests.no_such_module.Net",), ("cannot be imported", "No module named 'tests.no_such_module'")),
    (("model._target_=tests.user_models.NoSuchNet",), ("has no 'NoSuchNet'", "TinyNet")),
    (("model._target_=tests.user_models.NotAModule",), ("not a torch.nn.Module",)),
    ((TINY, "model.depth=3"), ("unexpected keyword argument 'depth'", "it takes: num_inputs, num_outputs, width")),
    (("model._target_=tests.user_models.OneTooMany",), ("output has shape [8, 2]", "targets need [8, 1]")),
    (("model._target_=tests.user_models.FrozenNet",), ("no trainable parameters",)),
    (("model=tests.user_models.TinyNet",), ("not a model option", "model._target_=tests.user_models.TinyNet")),
    ((TINY, "loss._target_=tests.user_models.per_row_loss"), ("not a scalar tensor",)),
    ((TINY, "loss._target_=tests.user_models.nan_loss"), ("is nan on the first batch",)),
    ((TINY, "loss._target_=tests.user_models.detached_loss"), ("without a gradient",)),
    (
        (TINY, "data=moons", "metrics=[{_target_:torchmetrics.classification.MulticlassConfusionMatrix}]"),
        ("'multiclassconfusionmatrix' computes [2, 2], not one number",),
    ),
    ((TINY, "loss=cross_entropy"), ("loss=cross_entropy is for classification",)),
    ((TINY, "data=moons", "metrics=[r2]"), ("'r2' does not apply to classification",)),
    ((TINY, "metrics=[f2]"), ("'f2' is not one of",)),
    ((TINY, "objective.metric=val/f1"), ("objective.metric='val/f1' is not a metric of this run",)),
    ((TINY, "checkpoint.save_best=true", "data.val_fraction=0"), ("no validation split",)),
    (("model=graph", "loss=l1"), ("model=graph builds its own loss",)),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_user_input_is_one_line(tmp_path: Path, overrides: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    one_line_refusal(run_dtrain(tmp_path / "run", *overrides), *fragments)


def test_predicts_bad_arguments_are_one_line(tmp_path: Path) -> None:
    run = assert_ok(run_dtrain(tmp_path / "run", "trainer.max_epochs=1"))
    for args, fragment in [
        ((str(run.run_dir), "--out", str(tmp_path / "no" / "p.csv")), "no directory"),
        ((str(run.run_dir / "model.pt"), "--best"), "drop --best"),
        ((str(tmp_path / "nowhere"),), "no such run directory or model file"),
        ((str(run.run_dir), "--best"), "kept no best model"),
    ]:
        code, _, err = main_in_process("predict", *args)
        assert code == 2 and err.startswith("dtrain: error: ") and fragment in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------------------
# Parts, in process


def test_an_empty_shard_sums_to_zero_for_every_loss() -> None:
    from dtrain.config import LossConfig, UserLossConfig
    from dtrain.train.objective import build_loss, metric_sums

    for name in ("mse", "l1", "huber"):
        loss = build_loss(LossConfig(name=name), "regression")
        assert float(metric_sums(loss, torch.zeros(0, 1), torch.zeros(0, 1), accuracy=False)["loss"]) == 0.0
    user = build_loss(UserLossConfig(target="tests.user_models.scaled_mse"), "regression")
    assert float(user.total(torch.zeros(0, 1), torch.zeros(0, 1))) == 0.0  # not 0 x nan
    ce = build_loss(LossConfig(), "classification")
    sums = metric_sums(ce, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), accuracy=True)
    assert float(sums["loss"]) == 0.0 and float(sums["accuracy"]) == 0.0


def test_a_checkpoint_written_before_the_new_keys_still_resumes(tmp_path: Path) -> None:
    from dtrain.checkpoint import CheckpointError, config_changes
    from dtrain.compose import compose_config
    from dtrain.config import to_plain

    current = to_plain(compose_config(["trainer.max_epochs=2"]))
    old = {k: v for k, v in current.items() if k not in ("loss", "metrics")}
    old["trainer"] = {k: v for k, v in current["trainer"].items() if k != "early_stopping"}
    old["checkpoint"] = {k: v for k, v in current["checkpoint"].items() if k != "save_best"}
    assert config_changes(old, current, 1, 1, [], tmp_path) == []
    with pytest.raises(CheckpointError, match=r"loss\.name was 'auto', now 'l1'"):
        config_changes(old, to_plain(compose_config(["loss=l1"])), 1, 1, [], tmp_path)


def test_the_watch_starts_over_when_the_objective_changes() -> None:
    from dtrain.compose import compose_config
    from dtrain.train.state import Progress
    from dtrain.train.watch import ObjectiveWatch

    progress = Progress(step=10, best_value=0.1, best_step=10, stop_best=0.1, evals_without_improvement=1)
    progress.watched = "auto:min"
    ObjectiveWatch(compose_config(["checkpoint.save_best=true"])).adopt(progress)
    assert progress.best_value == 0.1 and progress.watched == "auto:min"  # the same objective: kept
    changed = compose_config(["checkpoint.save_best=true", "objective.metric=val/accuracy", "objective.mode=max"])
    ObjectiveWatch(changed).adopt(progress)
    assert progress.best_value is None and progress.evals_without_improvement == 0
    assert progress.watched == "val/accuracy:max"
