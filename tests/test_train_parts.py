"""The training loop's parts, each in process: cadence, stopwatch, non-finite policy, strategies, evaluation,
the log window, fault injection and the preemption flag. The end-to-end tests reach them only together."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from dtrain import dist
from dtrain.config import FaultConfig, LossConfig, OptimConfig, TrainerConfig
from dtrain.data.dataset import Split
from dtrain.faults import Faults
from dtrain.graph import builders
from dtrain.models import MLP, Polynomial, gradient_source
from dtrain.models.graph import GraphModel
from dtrain.models.sizes import ModelSizes
from dtrain.preemption import Preemption
from dtrain.train.cadence import MAX_FIGURES, Cadence
from dtrain.train.evaluation import evaluate
from dtrain.train.log_window import LogWindow
from dtrain.train.logger import use_fast_event_checksums
from dtrain.train.metrics import ValMetrics
from dtrain.train.monitor import StepMonitor
from dtrain.train.nonfinite import NonFinitePolicy, StopTraining
from dtrain.train.objective import build_loss
from dtrain.train.state import Progress
from dtrain.train.stopwatch import Stopwatch
from dtrain.train.strategy import AutogradStrategy, EngineStrategy, build_strategy

ONE_PROCESS = dist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


class _SilentLogger:
    def histogram(self, *args: object) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Cadence


def test_cadence_logs_every_n_steps_at_checkpoints_and_at_the_end() -> None:
    cadence = Cadence(total_steps=23, steps_per_epoch=5, log_every=10, checkpoint_every=4)
    assert [s for s in range(1, 24) if cadence.checkpoints(s)] == [4, 8, 12, 16, 20, 23]
    assert [s for s in range(1, 24) if cadence.logs(s)] == [4, 8, 10, 12, 16, 20, 23]
    assert [s for s in range(1, 24) if cadence.ends_epoch(s)] == [5, 10, 15, 20]
    assert cadence.step_in_epoch(12, 2) == 2


def test_default_evaluation_is_at_epoch_ends_no_more_often_than_logging_and_at_the_end() -> None:
    cadence = Cadence(total_steps=20, steps_per_epoch=1, log_every=5)
    evaluated_at, evaluated = -1, []
    for step in range(1, 21):
        if cadence.evaluates(step, evaluated_at):
            evaluated_at = step
            evaluated.append(step)
    assert evaluated == [5, 10, 15, 20]
    every = Cadence(total_steps=7, steps_per_epoch=3, log_every=1, eval_every=3)
    assert [s for s in range(1, 8) if every.evaluates(s, -1)] == [3, 6, 7]
    assert not every.evaluates(7, 7)  # already evaluated after this step


def test_own_signal_checks_skip_logging_steps_which_carry_the_flag() -> None:
    cadence = Cadence(total_steps=100, steps_per_epoch=100, log_every=10, signal_check_every=4)
    assert [s for s in range(1, 25) if cadence.checks_signals(s)] == [4, 8, 12, 16, 24]
    assert not any(Cadence(100, 100, 10).checks_signals(s) for s in range(1, 101))  # 0: logging steps only


def test_figures_are_spaced_to_at_most_about_max_figures_a_run() -> None:
    cadence = Cadence(total_steps=1000, steps_per_epoch=1, log_every=1)
    figured_at, drawn = None, []
    for step in range(1, 1001):
        if cadence.draws_figures(step, figured_at):
            figured_at = step
            drawn.append(step)
    assert drawn[0] == 1 and drawn[-1] == 1000 and len(drawn) <= MAX_FIGURES + 1


# ---------------------------------------------------------------------------------------------
# Stopwatch


def test_stopwatch_leaves_time_set_aside_out_of_training_time(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    watch = Stopwatch(prior_train_s=5.0, prior_wall_s=7.0)
    now[0] += 2.0  # training
    with watch.aside():
        now[0] += 3.0  # evaluation
    now[0] += 1.0
    assert watch.lap() == pytest.approx(3.0)
    now[0] += 4.0
    assert watch.lap() == pytest.approx(4.0)
    assert watch.train_s() == pytest.approx(5.0 + 7.0)
    assert watch.wall_s() == pytest.approx(7.0 + 10.0)


# ---------------------------------------------------------------------------------------------
# Non-finite policy


def _params(*grads: float) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.full((2,), g)
        params.append(p)
    return params


def test_skip_policy_skips_non_finite_steps_and_diverges_after_too_many_in_a_row() -> None:
    trainer = TrainerConfig(on_nonfinite="skip", max_skipped_steps=2)
    params = _params(1.0)
    policy = NonFinitePolicy(trainer, OptimConfig(), params, ONE_PROCESS)
    progress = Progress()
    assert not policy.skip(torch.tensor(1.0), 1, progress)
    assert policy.skip(torch.tensor(math.nan), 2, progress)
    params[0].grad.fill_(math.inf)
    assert policy.skip(torch.tensor(1.0), 3, progress)
    assert progress.skipped_in_a_row == 2 and progress.skipped_steps == 2
    with pytest.raises(StopTraining, match="3 steps in a row had a non-finite loss") as stop:
        policy.skip(torch.tensor(1.0), 4, progress)
    assert stop.value.status == "diverged" and "trainer.max_skipped_steps=2" in stop.value.message


def test_stop_policy_costs_nothing_per_step_and_stops_at_a_non_finite_log() -> None:
    policy = NonFinitePolicy(TrainerConfig(), OptimConfig(lr=0.5), _params(math.nan), ONE_PROCESS)
    assert not policy.skip(torch.tensor(math.nan), 1, Progress())  # never skips: decided at logging steps
    policy.check_logged(0, 10, {"train/loss": 1.0, "grad_norm/total": 2.0})
    with pytest.raises(StopTraining, match=r"between steps 1 and 10 .*optim.lr=0.5.*clip_grad_norm=1.0"):
        policy.check_logged(0, 10, {"train/loss": math.inf})
    with pytest.raises(StopTraining, match="at step 10"):
        policy.check_logged(9, 10, {"train/loss": 1.0, "grad_norm/total": math.nan})


# ---------------------------------------------------------------------------------------------
# Strategies: chosen by the model's kind, in one place


def _engine_mlp(reference: MLP) -> GraphModel:
    named = {name: p.detach().clone() for name, p in reference.named_parameters()}
    layers = [
        (named["blocks.0.linear.weight"], named["blocks.0.linear.bias"]),
        (named["head.weight"], named["head.bias"]),
    ]
    return GraphModel(builders.mlp(layers, "tanh", "regression"))


def test_the_strategy_follows_the_model_and_both_give_the_same_accumulated_gradients() -> None:
    torch.manual_seed(0)
    torch_model = MLP(3, [5], 1, activation="tanh").double()
    engine_model = _engine_mlp(torch_model)
    assert gradient_source(torch_model) == "autograd" and gradient_source(engine_model) == "engine"
    trainer = TrainerConfig(precision="float64")
    autograd = build_strategy(torch_model, ONE_PROCESS, trainer, F.mse_loss)
    engine = build_strategy(engine_model, ONE_PROCESS, trainer, F.mse_loss)
    assert isinstance(autograd, AutogradStrategy) and isinstance(engine, EngineStrategy)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    micro = [(x[:6], y[:6]), (x[6:], y[6:])]
    ours = autograd.forward_backward(micro, step=1)
    theirs = engine.forward_backward(micro, step=1)
    whole = F.mse_loss(torch_model(x), y)
    assert ours.item() == pytest.approx(whole.item(), rel=1e-12)
    assert theirs.item() == pytest.approx(whole.item(), rel=1e-12)
    for (name, p), q in zip(torch_model.named_parameters(), engine_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert set(engine.run_files(x, y)) == {"graph.dot"} and autograd.run_files(x, y) == {}


def test_a_loss_scale_scales_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = Polynomial(2, 2).double()
    strategy = build_strategy(model, ONE_PROCESS, TrainerConfig(precision="float64"), F.mse_loss)
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    plain = strategy.forward_backward([(x, y)], step=1)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    poisoned = strategy.forward_backward([(x, y)], step=1, loss_scale=math.nan)
    assert math.isfinite(plain.item()) and math.isnan(poisoned.item())
    assert all(torch.isnan(p.grad).all() for p in model.parameters()) and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Evaluation, the log window, faults, preemption


def test_chunked_evaluation_equals_one_pass() -> None:
    torch.manual_seed(0)
    model = MLP(2, [8], 3).double()
    x = torch.randn(103, 2, dtype=torch.float64)
    val = {"": Split(x, torch.randint(0, 3, (103,)))}
    loss = build_loss(LossConfig(), "classification")
    metrics = ValMetrics(None, ModelSizes(2, 3, "classification", 3), loss)
    whole = evaluate(model, model, val, loss, metrics, ONE_PROCESS, chunk=1000)
    chunked = evaluate(model, model, val, loss, metrics, ONE_PROCESS, chunk=7)
    assert whole.keys() == {"val/loss", "val/accuracy"}
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)
    logits = model(x)
    assert whole["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, val[""].y).item(), rel=1e-12)
    assert model.training  # evaluation ran in eval mode and gave the mode back


def test_the_log_window_averages_the_counted_steps_and_starts_afresh() -> None:
    params = _params(3.0, 4.0)
    named = [("a", params[0]), ("b", params[1])]
    monitor = StepMonitor(named, None, None, 0, _SilentLogger(), torch.device("cpu"))  # type: ignore[arg-type]
    window = LogWindow(monitor, ONE_PROCESS, global_batch=32, dtype=torch.float64)
    progress = Progress(steps_since_log=4, skipped_steps=1)
    for loss in (1.0, 2.0, 6.0):  # the fourth step was skipped: its loss does not count
        window.add(torch.tensor(loss, dtype=torch.float64), progress)
    monitor.clip(4, log_now=True)
    values, riders = window.close(4, 0.1, False, progress, Stopwatch(), riders=[1.0])
    assert values["train/loss"] == pytest.approx(3.0) and values["lr"] == 0.1 and riders == [1.0]
    assert values["grad_norm/total"] == pytest.approx(math.sqrt(2 * 9 + 2 * 16))
    assert values["train/skipped_steps"] == 1.0 and values["perf/samples_per_sec"] > 0
    window.reset(progress)
    assert window.loss_sum.item() == 0 and progress.steps_since_log == progress.losses_since_log == 0


def test_a_nan_fault_poisons_only_its_step_on_its_rank() -> None:
    faults = Faults(FaultConfig(kind="nan", step=3, rank=0), rank=0)
    assert faults.armed and [math.isnan(faults.loss_scale(s)) for s in (2, 3, 4)] == [False, True, False]
    assert not Faults(FaultConfig(kind="nan", step=3, rank=1), rank=0).armed


def test_one_process_sees_its_stop_signal_at_once_and_ranks_agree_through_the_logged_flag() -> None:
    with Preemption(ONE_PROCESS) as preemption:
        assert preemption.flag() == 0.0 and not preemption.agreed(1)
        signal.raise_signal(signal.SIGUSR1)
        assert preemption.flag() == 1.0 and preemption.agreed(2, check_now=False)
    two_ranks = dist.DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
    peer = Preemption(two_ranks)
    assert not peer.agreed(5, check_now=False)  # no own check due, nothing logged yet
    peer.observe(0.0)
    assert not peer.agreed(6, check_now=False)
    peer.observe(1.0)  # a logging step's all-reduce carried another rank's flag
    assert peer.agreed(7, check_now=False) and peer.signal_name == "a peer rank's signal"


def test_fast_event_checksums_equal_tensorboards_own() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    from tensorboard.summary.writer import record_writer

    use_fast_event_checksums()
    assert record_writer.masked_crc32c is not reference
    for data in (b"", b"a", bytes(range(256)) * 3, b"train/loss" * 70):
        assert record_writer.masked_crc32c(data) == reference(data)
