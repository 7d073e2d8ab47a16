"""The population's batched optimizers and clipping against torch.optim and torch.nn.utils on each member alone.

Every comparison runs in float64 on a small model whose gradient depends nonlinearly on its parameters, with a
learning rate that changes every step, so that a wrong formula, a wrong order of operations or a member's value
leaking into another compounds over the 200 steps instead of hiding in a single one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from dtrain.population.optim import (
    BatchedOptimizer,
    build_batched_optimizer,
    clip_grad_norm_,
    clip_grad_value_,
    member_grad_norms,
)

M = 5
SHAPES = [(3, 4), (4,), ()]  # the model's W, b and s
STEPS = 200
DECAY = 0.99  # the schedule: member m's rate at step t is LR0[m] * DECAY**t
TOL = 1e-10

_data = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, generator=_data, dtype=torch.float64)
Y = torch.randn(8, generator=_data, dtype=torch.float64)

# Per-member hyperparameters: zero and nonzero momentum and weight decay, beta1 = 0 (no first moment), a large eps.
SGD_LR = [0.05, 0.1, 0.02, 0.08, 0.03]
SGD_HPARAMS = {"momentum": [0.0, 0.9, 0.5, 0.0, 0.99], "weight_decay": [0.0, 0.0, 1e-2, 0.1, 1e-3]}
ADAM_LR = [1e-2, 3e-2, 5e-3, 2e-2, 1e-3]
ADAM_HPARAMS = {
    "beta1": [0.9, 0.8, 0.0, 0.95, 0.5],
    "beta2": [0.999, 0.99, 0.9, 0.9999, 0.95],
    "eps": [1e-8, 1e-6, 1e-3, 1e-10, 1e-8],
    "weight_decay": [0.0, 1e-2, 0.1, 0.0, 0.5],
}
CASES: dict[str, tuple[str, bool, list[float], dict[str, list[float]]]] = {
    "sgd": ("sgd", False, SGD_LR, SGD_HPARAMS),
    "sgd-nesterov": ("sgd", True, SGD_LR, SGD_HPARAMS),
    "adam": ("adam", False, ADAM_LR, ADAM_HPARAMS),
    "adamw": ("adamw", False, ADAM_LR, ADAM_HPARAMS),
    "adamw-defaults": ("adamw", False, ADAM_LR, {}),  # torch.optim's defaults on both sides
}
# Clipping limits per member: +inf (never clipped) next to limits that the gradients exceed.
MAX_NORM = [math.inf, 0.05, 1.0, 0.2, math.inf]
CLIP_VALUE = [math.inf, 0.01, 0.5, 0.05, 1.0]


def loss(w: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """A tanh layer's squared error plus p**2 (1 + sin p) per parameter; with a leading member axis, the sum."""
    pred = torch.tanh(X @ w + b.unsqueeze(-2)).sum(-1) * s.unsqueeze(-1)
    fit = ((pred - Y) ** 2).mean(-1).sum()
    return fit + sum(((torch.sin(p) + 1) * p**2).sum() for p in (w, b, s))


def initial_params() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(M, *shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def member_hparams(hparams: dict[str, list[float]], m: int) -> dict[str, float]:
    return {name: values[m] for name, values in hparams.items()}


def torch_optimizer(name: str, params: list[Tensor], hp: dict[str, float], nesterov: bool) -> torch.optim.Optimizer:
    """torch.optim's single-tensor path (foreach=False) with one member's hyperparameters; lr is set every step."""
    if name == "sgd":
        # torch.optim refuses nesterov without momentum; the batched SGD takes plain steps there.
        return torch.optim.SGD(params, lr=1.0, foreach=False, nesterov=nesterov and hp["momentum"] > 0, **hp)
    kwargs: dict = {key: hp[key] for key in ("eps", "weight_decay") if key in hp}
    if "beta1" in hp:
        kwargs["betas"] = (hp["beta1"], hp["beta2"])
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=1.0, foreach=False, **kwargs)


def clip_member(params: list[Tensor], clip: str | None, m: int) -> None:
    if clip == "norm":
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM[m])
    elif clip == "value":
        torch.nn.utils.clip_grad_value_(params, CLIP_VALUE[m])


def reference(
    case: str, clip: str | None = None, stop: dict[int, int] | None = None
) -> list[tuple[list[Tensor], torch.optim.Optimizer]]:
    """Each member on its own leaves with its own torch.optim optimizer; ``stop[m]``: the steps member m takes.

    The forward pass stacks the members' leaves so that one backward serves them all (five times faster than a
    backward per member, which keeps this file within its time budget); each member's loss reads its own leaves
    only, so each still receives exactly its own gradient.
    """
    name, nesterov, lr0, hparams = CASES[case]
    stop = stop or {}
    members = [[p.clone().requires_grad_() for p in init] for init in zip(*initial_params(), strict=True)]
    optimizers = [torch_optimizer(name, ps, member_hparams(hparams, m), nesterov) for m, ps in enumerate(members)]
    for t in range(STEPS):
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss(*[torch.stack(ps) for ps in zip(*members, strict=True)]).backward()
        for m, (params, optimizer) in enumerate(zip(members, optimizers, strict=True)):
            if t < stop.get(m, STEPS):
                clip_member(params, clip, m)
                optimizer.param_groups[0]["lr"] = lr0[m] * DECAY**t
                optimizer.step()
    return list(zip(members, optimizers, strict=True))


Inject = Callable[[int, list[Tensor]], None]


def population(
    case: str, clip: str | None = None, inject: Inject | None = None, steps: int = STEPS
) -> tuple[list[Tensor], BatchedOptimizer]:
    """All members trained at once; ``inject(t, grads)`` may spoil gradients, whose members are then frozen."""
    name, nesterov, lr0, hparams = CASES[case]
    params = [p.clone().requires_grad_() for p in initial_params()]
    tensors = {key: torch.tensor(values, dtype=torch.float64) for key, values in hparams.items()}
    optimizer = build_batched_optimizer(name, params, tensors, nesterov=nesterov)
    run(optimizer, params, lr0, clip, inject, range(steps))
    return params, optimizer


def run(
    optimizer: BatchedOptimizer,
    params: list[Tensor],
    lr0: list[float],
    clip: str | None,
    inject: Inject | None,
    steps: range,
) -> None:
    lr0_tensor = torch.tensor(lr0, dtype=torch.float64)
    active = torch.ones(M, dtype=torch.bool)
    for t in steps:
        grads = list(torch.autograd.grad(loss(*params), params))
        if inject is not None:
            inject(t, grads)
        active = active & torch.isfinite(member_grad_norms(grads))
        if clip == "norm":
            clip_grad_norm_(grads, torch.tensor(MAX_NORM, dtype=torch.float64))
        elif clip == "value":
            clip_grad_value_(grads, torch.tensor(CLIP_VALUE, dtype=torch.float64))
        optimizer.step(grads, lr0_tensor * DECAY**t, active)


def difference(a: Tensor, b: Tensor) -> float:
    # NaN counts as infinitely far: Python's max() would silently skip a NaN.
    return (a - b).abs().nan_to_num(nan=math.inf).max().item()


def max_difference(params: list[Tensor], optimizer: BatchedOptimizer, members: list) -> float:
    """The largest difference from the reference over parameters and optimizer state; step counts must be equal."""
    worst = 0.0
    for m, (ref_params, ref_optimizer) in enumerate(members):
        for k, ref_param in enumerate(ref_params):
            worst = max(worst, difference(params[k][m], ref_param))
            ref_state = ref_optimizer.state[ref_param]
            for name in optimizer.state_names:
                if ref_state.get(name) is not None:  # torch's SGD keeps no buffer without momentum
                    worst = max(worst, difference(optimizer.state[name][k][m], ref_state[name]))
            if "step" in ref_state:
                assert optimizer.steps[m].item() == ref_state["step"].item()
    return worst


# Every case unclipped, and clipping by value with one SGD and one Adam (it acts on the gradients, before the step);
# clipping by norm inside the loop is compared with torch in the frozen-members test below.
@pytest.mark.parametrize("case, clip", [(case, None) for case in CASES] + [("sgd", "value"), ("adamw", "value")])
def test_matches_torch_optim_per_member(case: str, clip: str | None) -> None:
    params, optimizer = population(case, clip)
    assert max_difference(params, optimizer, reference(case, clip)) <= TOL


def test_clipping_does_clip() -> None:
    # Otherwise the clipped runs could pass with clipping that does nothing.
    unclipped, _ = population("sgd", steps=20)
    for clip in ("norm", "value"):
        clipped, _ = population("sgd", clip, steps=20)
        assert (clipped[0][1] - unclipped[0][1]).abs().max() > 1e-3


# Member -> the step at which its gradient turns non-finite: in the first step, halfway, and late in the run.
SPOILED = {4: 0, 1: 50, 3: 120}


def spoil(t: int, grads: list[Tensor]) -> None:
    if t == SPOILED[1]:
        grads[0][1, 2, 3] = math.nan
    if t == SPOILED[3]:
        grads[2][3] = math.inf  # member 3 has no norm limit: inf / inf must not turn into NaN elsewhere
    if t >= SPOILED[4]:
        grads[1][4] = math.nan  # never a finite gradient: Adam's bias corrections divide by zero for it


def states(optimizer: BatchedOptimizer) -> list[Tensor]:
    return [tensor for name in optimizer.state_names for tensor in optimizer.state[name]]


@pytest.mark.parametrize("case", ["sgd-nesterov", "adam", "adamw"])
def test_frozen_members_keep_their_values_and_others_match(case: str) -> None:
    snapshots: dict[int, list[Tensor]] = {}

    def spoil_and_snapshot(t: int, grads: list[Tensor]) -> None:
        spoil(t, grads)
        for m, at in SPOILED.items():
            if t == at:
                snapshots[m] = [p[m].clone() for p in [*params, *states(optimizer)]]

    name, nesterov, lr0, hparams = CASES[case]
    params = [p.clone().requires_grad_() for p in initial_params()]
    tensors = {key: torch.tensor(values, dtype=torch.float64) for key, values in hparams.items()}
    optimizer = build_batched_optimizer(name, params, tensors, nesterov=nesterov)
    run(optimizer, params, lr0, "norm", spoil_and_snapshot, range(STEPS))

    for m, at in SPOILED.items():
        assert all(
            torch.equal(now[m], then) for now, then in zip([*params, *states(optimizer)], snapshots[m], strict=True)
        )
        assert optimizer.steps[m].item() == at
    assert max_difference(params, optimizer, reference(case, "norm", stop=SPOILED)) <= TOL


@pytest.mark.parametrize("case", ["sgd-nesterov", "adam", "adamw"])
def test_state_dict_round_trip_resumes_bit_for_bit(case: str) -> None:
    name, nesterov, lr0, _ = CASES[case]
    # Spoiled gradients leave members at different step counts (member 4 at none, member 1 steps again after 60).
    params, optimizer = population(case, "norm", spoil, steps=60)
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    # Built with default hyperparameters: only the state dict can give it the members' own.
    resumed = build_batched_optimizer(name, saved["params"], nesterov=nesterov)
    resumed.load_state_dict(saved["optimizer"])
    run(optimizer, params, lr0, "norm", spoil, range(60, 100))
    run(resumed, saved["params"], lr0, "norm", spoil, range(60, 100))
    assert all(torch.equal(a, b) for a, b in zip(params, saved["params"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(states(optimizer), states(resumed), strict=True))


def member_grads(scales: list[float], gen: torch.Generator) -> list[Tensor]:
    """Random gradients of the model's shapes, member m's scaled by ``scales[m]``."""
    scale = torch.tensor(scales, dtype=torch.float64)
    return [
        torch.randn(len(scales), *shape, generator=gen, dtype=torch.float64) * scale.reshape(-1, *([1] * len(shape)))
        for shape in SHAPES
    ]


def test_clip_grad_norm_matches_torch_per_member() -> None:
    # Plain, far above its limit, far below, no limit, no limit with an inf, a NaN with a limit.
    max_norm = [1.0, 0.1, 1.0, math.inf, math.inf, 1.0]
    grads = member_grads([1.0, 1e3, 1e-3, 1.0, 1.0, 1.0], torch.Generator().manual_seed(2))
    grads[0][4, 1, 1] = math.inf
    grads[1][5, 2] = math.nan
    before = [g.clone() for g in grads]

    norms = clip_grad_norm_(grads, torch.tensor(max_norm, dtype=torch.float64))

    for m in range(4):
        alone = [g[m].clone().requires_grad_() for g in before]
        for p, g in zip(alone, before, strict=True):
            p.grad = g[m].clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(alone, max_norm[m])
        torch.testing.assert_close(norms[m], expected_norm, rtol=1e-15, atol=0)
        for g, p in zip(grads, alone, strict=True):
            torch.testing.assert_close(g[m], p.grad, rtol=1e-15, atol=0)
    assert torch.linalg.vector_norm(torch.cat([g[1].flatten() for g in grads])) == pytest.approx(0.1, rel=1e-6)
    assert norms[4].item() == math.inf
    assert all(torch.equal(g[4], b[4]) for g, b in zip(grads, before, strict=True))  # not clipped, no NaN
    assert math.isnan(norms[5].item())


def test_clip_grad_value_matches_torch_per_member() -> None:
    clip = [0.5, 1e-3, math.inf, 2.0, 0.1]
    grads = member_grads([1.0, 1.0, 1e3, 3.0, 1e-3], torch.Generator().manual_seed(3))
    before = [g.clone() for g in grads]
    clip_grad_value_(grads, torch.tensor(clip, dtype=torch.float64))
    for m in range(M):
        alone = [g[m].clone().requires_grad_() for g in before]
        for p, g in zip(alone, before, strict=True):
            p.grad = g[m].clone()
        torch.nn.utils.clip_grad_value_(alone, clip[m])
        assert all(torch.equal(g[m], p.grad) for g, p in zip(grads, alone, strict=True))
    assert not all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_step_and_clipping_never_read_values_on_the_host(name: str) -> None:
    # Meta tensors have no values: any .item(), .tolist() or `if tensor:` in the hot path raises here.
    meta = {"device": "meta", "dtype": torch.float64}
    params = [torch.empty(M, *shape, **meta) for shape in SHAPES]
    grads = [torch.empty(M, *shape, **meta) for shape in SHAPES]
    optimizer = build_batched_optimizer(name, params, nesterov=name == "sgd")
    member_grad_norms(grads)
    clip_grad_norm_(grads, torch.empty(M, **meta))
    clip_grad_value_(grads, torch.empty(M, **meta))
    optimizer.step(grads, torch.empty(M, **meta), torch.empty(M, device="meta", dtype=torch.bool))
    assert optimizer.steps.device.type == "meta"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: build_batched_optimizer("rmsprop", initial_params()), "valid names: sgd, adam, adamw"),
        (lambda: build_batched_optimizer("adam", initial_params(), nesterov=True), "nesterov applies to sgd only"),
        (
            lambda: build_batched_optimizer("sgd", initial_params(), {"beta1": torch.zeros(M)}),
            r"unknown hyperparameters",
        ),
        (
            lambda: build_batched_optimizer("adam", initial_params(), {"eps": torch.zeros(M + 1)}),
            r"'eps' has shape \(6,\)",
        ),
        (lambda: build_batched_optimizer("sgd", []), "at least one parameter"),
        (lambda: build_batched_optimizer("sgd", [torch.zeros(M, 2), torch.zeros(M + 1)]), r"parameter 1 has shape"),
        (
            lambda: build_batched_optimizer("sgd", initial_params()).step(
                [torch.zeros(M, *s) for s in SHAPES], torch.zeros(M, 1), torch.ones(M, dtype=torch.bool)
            ),
            r"lr has shape \(5, 1\)",
        ),
        (
            lambda: build_batched_optimizer("adam", initial_params()).load_state_dict(
                build_batched_optimizer("sgd", initial_params()).state_dict()
            ),
            r"missing \['exp_avg.0'",
        ),
    ],
)
def test_errors_name_the_problem(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
