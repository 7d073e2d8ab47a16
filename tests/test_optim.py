"""Unit tests of the optimizers and learning-rate schedules built from config."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from dtrain import config as C
from dtrain.errors import UserError
from dtrain.optim import build_optimizer, build_scheduler, lr_factor


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Schedule factors against their formulas


def test_constant_is_one() -> None:
    factor = lr_factor(C.ScheduleConfig(name="constant"), base_lr=0.3, total=50)
    assert all(factor(t) == 1.0 for t in range(60))


@pytest.mark.parametrize("min_lr", [0.0, 0.01, 0.05])
def test_exp_decay_with_floor(min_lr: float) -> None:
    lr0, decay = 0.1, 0.9
    factor = lr_factor(C.ScheduleConfig(name="exp_decay", decay=decay, min_lr=min_lr), base_lr=lr0, total=100)
    for t in range(100):
        expected_lr = max(min_lr, lr0 * decay**t)
        assert lr0 * factor(t) == approx(expected_lr)
    if min_lr > 0:
        # The floor is actually reached within the run (0.1 * 0.9^t < 0.05 from t = 7).
        assert lr0 * factor(99) == approx(min_lr)


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (3, 0.1), (10, 0.7)])
def test_step(step_size: int, gamma: float) -> None:
    factor = lr_factor(C.ScheduleConfig(name="step", step_size=step_size, gamma=gamma), base_lr=1.0, total=40)
    for t in range(40):
        assert factor(t) == approx(gamma ** math.floor(t / step_size))
    # Constant within an interval, a jump by gamma across its boundary.
    assert factor(step_size - 1) == approx(1.0)
    assert factor(step_size) == approx(gamma)


@pytest.mark.parametrize("min_lr", [0.0, 0.02])
def test_cosine_endpoints_and_midpoint(min_lr: float) -> None:
    lr0, total = 0.1, 40
    factor = lr_factor(C.ScheduleConfig(name="cosine", min_lr=min_lr), base_lr=lr0, total=total)
    assert lr0 * factor(0) == approx(lr0)
    assert lr0 * factor(total // 2) == approx((lr0 + min_lr) / 2)
    assert lr0 * factor(total) == approx(min_lr)
    assert lr0 * factor(total + 25) == approx(min_lr)  # stays at the floor past the end
    # A quarter of the way: cos(pi/4) = sqrt(2)/2.
    assert lr0 * factor(total // 4) == approx(min_lr + (lr0 - min_lr) * (1 + math.sqrt(0.5)) / 2)
    values = [factor(t) for t in range(total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # non-increasing


@pytest.mark.parametrize("name", ["constant", "exp_decay", "step", "cosine"])
def test_warmup_linear_then_hand_off(name: str) -> None:
    warmup, total, lr0 = 5, 30, 0.2
    cfg = C.ScheduleConfig(name=name, warmup=warmup, decay=0.9, step_size=4, gamma=0.5, min_lr=0.001)
    with_warmup = lr_factor(cfg, base_lr=lr0, total=total)
    # The schedule proper, over what is left of the run after the warmup.
    plain = lr_factor(dataclasses.replace(cfg, warmup=0), base_lr=lr0, total=total - warmup)
    for t in range(warmup):
        assert with_warmup(t) == approx((t + 1) / (warmup + 1))
    # Linear: equal increments of 1 / (warmup + 1), reaching the base lr at the hand-off.
    increments = {round(with_warmup(t + 1) - with_warmup(t), 12) for t in range(warmup - 1)}
    assert increments == {round(1 / (warmup + 1), 12)}
    for t in range(warmup, total + 5):
        assert with_warmup(t) == approx(plain(t - warmup))
    assert with_warmup(warmup) == approx(1.0)  # every schedule starts at the base lr


def test_warmup_cosine_reaches_floor_at_end_of_run() -> None:
    warmup, total, lr0, min_lr = 4, 24, 0.5, 0.05
    factor = lr_factor(C.ScheduleConfig(name="cosine", warmup=warmup, min_lr=min_lr), base_lr=lr0, total=total)
    assert lr0 * factor(total) == approx(min_lr)
    assert lr0 * factor(warmup + (total - warmup) // 2) == approx((lr0 + min_lr) / 2)


def test_unknown_schedule_raises() -> None:
    factor = lr_factor(C.ScheduleConfig(name="linear"), base_lr=0.1, total=10)
    with pytest.raises(ValueError, match="linear"):
        factor(0)


# ---------------------------------------------------------------------------------------------
# build_scheduler driving a real optimizer


def make_sgd(lr: float) -> torch.optim.Optimizer:
    param = torch.nn.Parameter(torch.ones(3))
    return torch.optim.SGD([param], lr=lr)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (C.ScheduleConfig(name="constant"), lambda t: 0.1),
        (C.ScheduleConfig(name="exp_decay", decay=0.8, min_lr=0.02), lambda t: max(0.02, 0.1 * 0.8**t)),
        (C.ScheduleConfig(name="step", step_size=3, gamma=0.5), lambda t: 0.1 * 0.5 ** (t // 3)),
        (
            C.ScheduleConfig(name="cosine", min_lr=0.01),
            lambda t: 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * min(t, 12) / 12)) / 2,
        ),
        (
            C.ScheduleConfig(name="cosine", warmup=3),
            lambda t: 0.1 * (t + 1) / 4 if t < 3 else 0.1 * (1 + math.cos(math.pi * min(t - 3, 9) / 9)) / 2,
        ),
    ],
    ids=["constant", "exp_decay", "step", "cosine", "warmup_cosine"],
)
def test_build_scheduler_sets_lr(cfg: C.ScheduleConfig, expected) -> None:
    optimizer = make_sgd(0.1)
    scheduler = build_scheduler(optimizer, cfg, total=12)
    for t in range(16):
        assert optimizer.param_groups[0]["lr"] == approx(expected(t)), f"t={t}"
        assert scheduler.get_last_lr()[0] == approx(expected(t))
        optimizer.step()
        scheduler.step()


def test_build_scheduler_scales_every_param_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.4}])
    scheduler = build_scheduler(optimizer, C.ScheduleConfig(name="step", step_size=2, gamma=0.1), total=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [approx(0.1 * 0.01), approx(0.4 * 0.01)]


# ---------------------------------------------------------------------------------------------
# build_optimizer


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    "cfg, cls, expected",
    [
        (
            C.OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
            torch.optim.SGD,
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
        ),
        (
            C.OptimConfig(name="sgd", lr=0.2),
            torch.optim.SGD,
            {"lr": 0.2, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
        ),
        (
            C.OptimConfig(name="adam", lr=3e-4, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.01),
            torch.optim.Adam,
            {"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01},
        ),
        (
            C.OptimConfig(name="adamw", lr=1e-3, betas=[0.7, 0.9], eps=1e-7, weight_decay=0.1),
            torch.optim.AdamW,
            {"lr": 1e-3, "betas": (0.7, 0.9), "eps": 1e-7, "weight_decay": 0.1},
        ),
        (
            C.OptimConfig(name="adagrad", lr=0.02, lr_decay=1e-4, eps=1e-9, weight_decay=0.5),
            torch.optim.Adagrad,
            {"lr": 0.02, "lr_decay": 1e-4, "eps": 1e-9, "weight_decay": 0.5},
        ),
        (
            C.OptimConfig(name="rmsprop", lr=0.003, alpha=0.9, eps=1e-5, weight_decay=0.2, momentum=0.5),
            torch.optim.RMSprop,
            {"lr": 0.003, "alpha": 0.9, "eps": 1e-5, "weight_decay": 0.2, "momentum": 0.5},
        ),
    ],
    ids=["sgd", "sgd-defaults", "adam", "adamw", "adagrad", "rmsprop"],
)
def test_build_optimizer(cfg: C.OptimConfig, cls: type, expected: dict[str, object]) -> None:
    ps = params()
    optimizer = build_optimizer(iter(ps), cfg)  # any iterable, e.g. model.parameters()
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in ps]
    for key, value in expected.items():
        got = group[key]
        if isinstance(value, tuple):
            assert tuple(got) == value, key
        else:
            assert got == value, key


def test_build_optimizer_steps_sgd_by_hand() -> None:
    """The optimizer is usable: one plain SGD step moves each parameter by -lr * grad."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = build_optimizer([p], C.OptimConfig(name="sgd", lr=0.25))
    p.grad = torch.tensor([4.0, 8.0], dtype=torch.float64)
    optimizer.step()
    assert p.detach().tolist() == [1.0 - 0.25 * 4.0, -2.0 - 0.25 * 8.0]


def test_build_optimizer_unknown_name() -> None:
    with pytest.raises(ValueError, match="lion"):
        build_optimizer(params(), C.OptimConfig(name="lion"))


def test_nesterov_without_momentum_is_user_error() -> None:
    optim = C.OptimConfig(name="sgd", nesterov=True, momentum=0.0)
    config = C.Config(model=C.PolynomialConfig(), data=C.Poly2dConfig(), optim=optim, schedule=C.ScheduleConfig())
    try:
        C.check(config)
    except UserError:
        return  # rejected up front: fine
    with pytest.raises(UserError):
        build_optimizer(params(), optim)
