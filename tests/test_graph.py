"""The engine's gradients against torch.autograd and central finite differences (float64)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

import dtrain.graph as G
from dtrain.graph import builders
from dtrain.models import MLP, Polynomial

TOL = 1e-8


def rand(*shape: int, positive: bool = False, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    return t.abs() + 0.5 if positive else t


def check_against_torch(
    build: Callable[..., G.Node], torch_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor
) -> None:
    """Build the same scalar function both ways from parameters holding ``tensors``; compare values and grads."""
    params = [G.Parameter(t.clone(), f"p{i}") for i, t in enumerate(tensors)]
    graph = G.Graph(build(*params))
    value = graph.forward()
    graph.backward()
    leaves = [t.clone().requires_grad_() for t in tensors]
    expected = torch_fn(*leaves)
    expected.backward()
    torch.testing.assert_close(value, expected.detach(), rtol=TOL, atol=TOL)
    for p, leaf in zip(params, leaves, strict=True):
        assert G.relative_error(p.tensor.grad, leaf.grad) <= TOL, p.name
    numeric = G.finite_difference_grads(graph, {})
    for p in params:
        assert G.relative_error(p.tensor.grad, numeric[p.name]) <= 1e-6, p.name


# Each case: engine expression, the same in torch, and operand shapes (broadcasting included).
BINARY = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "sub": (lambda a, b: a - b, lambda a, b: a - b),
    "mul": (lambda a, b: a * b, lambda a, b: a * b),
    "div": (lambda a, b: a / b, lambda a, b: a / b),
}
SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((3, 4), ())]


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize(("sa", "sb"), SHAPES)
def test_binary_ops_with_broadcasting(name: str, sa: tuple, sb: tuple) -> None:
    engine, reference = BINARY[name]
    a, b = rand(*sa), rand(*sb, positive=name == "div", seed=1)
    weights = rand(*torch.broadcast_shapes(sa, sb), seed=2)  # a non-uniform upstream gradient
    check_against_torch(
        lambda p, q: G.sum(engine(p, q) * G.Constant(weights)),
        lambda p, q: (reference(p, q) * weights).sum(),
        a,
        b,
    )


UNARY = {
    "neg": (lambda a: -a, lambda a: -a, False),
    "exp": (G.exp, torch.exp, False),
    "log": (G.log, torch.log, True),
    "tanh": (G.tanh, torch.tanh, False),
    "sigmoid": (G.sigmoid, torch.sigmoid, False),
    "relu": (G.relu, torch.relu, False),
    "pow2": (lambda a: a**2, lambda a: a**2, False),
    "pow3": (lambda a: a**3, lambda a: a**3, False),
    "pow-1": (lambda a: a**-1, lambda a: a**-1, True),
    "pow0.5": (lambda a: a**0.5, lambda a: a**0.5, True),
    "pow1.7": (lambda a: a**1.7, lambda a: a**1.7, True),
    "transpose": (G.transpose, lambda a: a.transpose(-1, -2), False),
    "slice": (lambda a: a[:, 1:3], lambda a: a[:, 1:3], False),
}


@pytest.mark.parametrize("name", UNARY)
def test_unary_ops(name: str) -> None:
    engine, reference, positive = UNARY[name]
    a = rand(3, 4, positive=positive)
    out_shape = reference(a).shape
    weights = rand(*out_shape, seed=3)
    check_against_torch(lambda p: G.sum(engine(p) * G.Constant(weights)), lambda p: (reference(p) * weights).sum(), a)


@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_reductions_along_each_axis(axis: int | None, reduce: str) -> None:
    a = rand(2, 3, 4)
    engine = getattr(G, reduce)
    ref = getattr(torch, reduce)
    out_shape = (ref(a) if axis is None else ref(a, dim=axis)).shape
    weights = rand(*out_shape, seed=4)
    check_against_torch(
        lambda p: G.sum(engine(p, axis) * G.Constant(weights)),
        lambda p: ((ref(p) if axis is None else ref(p, dim=axis)) * weights).sum(),
        a,
    )


def test_matmul_with_batch_broadcasting() -> None:
    check_against_torch(lambda a, b: G.sum(a @ b), lambda a, b: (a @ b).sum(), rand(2, 3, 4), rand(4, 5))


def test_losses() -> None:
    target = rand(6, 1, seed=9)
    for reduction in ("mean", "sum"):
        check_against_torch(
            lambda p, r=reduction: G.mse(p, G.Constant(target), r),
            lambda p, r=reduction: torch.nn.functional.mse_loss(p, target, reduction=r),
            rand(6, 1),
        )
    labels = torch.tensor([0, 2, 1, 2])
    logits = rand(4, 3) * 30  # large logits: only a stable log-sum-exp survives these
    check_against_torch(
        lambda p: G.cross_entropy(p, G.Constant(labels)),
        lambda p: torch.nn.functional.cross_entropy(p, labels),
        logits,
    )


def test_fan_out_is_summed_once_per_consumer() -> None:
    """y = x*x + x*3 + x: x feeds four consumers; dy/dx = 2x + 4."""
    check_against_torch(lambda x: G.sum(x * x + x * 3.0 + x), lambda x: (x * x + x * 3.0 + x).sum(), rand(5))


def test_deep_fan_out_has_no_2_to_the_depth_error() -> None:
    """y = x; y = y + y, d times: dy/dx = 2^d exactly. Counting a fan-out twice per level gives 4^d."""
    x = G.Parameter(torch.tensor(1.5), "x")
    y: G.Node = x
    for _ in range(20):
        y = y + y
    graph = G.Graph(y)
    assert graph.forward().item() == 1.5 * 2**20
    graph.backward()
    assert x.tensor.grad.item() == 2**20


def test_shared_parameter_used_in_two_places() -> None:
    check_against_torch(lambda w: G.sum(G.tanh(w) * w**2), lambda w: (torch.tanh(w) * w**2).sum(), rand(3, 3))


def test_power_at_base_zero() -> None:
    for p, expected in [(1, 1.0), (2, 0.0), (3, 0.0), (0, 0.0)]:
        x = G.Parameter(torch.zeros(1), "x")
        graph = G.Graph(G.sum(x**p))
        graph.forward()
        graph.backward()
        assert x.tensor.grad.item() == expected, p


def test_a_100000_node_chain_runs_without_recursion() -> None:
    x = G.Parameter(torch.tensor(1.0), "x")
    y: G.Node = x
    for _ in range(100_000):
        y = y * 1.0
    graph = G.Graph(y)
    assert len(graph.order) == 200_001  # each step adds a mul and its constant
    graph.forward()
    graph.backward()
    assert x.tensor.grad.item() == 1.0


def test_graphs_leave_no_reference_cycles() -> None:
    gc.collect()
    gc.disable()
    try:
        x = G.Parameter(torch.ones(3), "x")
        graph = G.Graph(G.sum(G.exp(x) * x))
        graph.forward()
        graph.backward()
        probe = weakref.ref(graph.order[-1])
        del graph
        assert probe() is None  # freed by reference counting alone, with the cycle collector off
    finally:
        gc.enable()


def test_polynomial_builder_matches_the_torch_model() -> None:
    torch.manual_seed(0)
    torch_model = Polynomial(2, 2).double()
    built = builders.polynomial([p.detach().clone() for p in torch_model.coefficients()], 2, 2)
    x, y = rand(50, 2), rand(50, 1, seed=5)
    loss = built.loss.forward(x=x, y=y)
    built.loss.backward()
    expected = torch.nn.functional.mse_loss(torch_model(x), y)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for p in built.parameters:
        assert G.relative_error(p.tensor.grad, getattr(torch_model, p.name).grad) <= TOL
    assert max(G.gradcheck(built.loss, {"x": x, "y": y}).values()) <= 1e-6


@pytest.mark.parametrize(("task", "activation"), [("regression", "tanh"), ("classification", "relu")])
def test_mlp_builder_matches_the_torch_model(task: str, activation: str) -> None:
    torch.manual_seed(0)
    outputs = 3 if task == "classification" else 1
    torch_model = MLP(2, [8, 8], outputs, activation=activation).double()
    named = dict(torch_model.named_parameters())
    layers = [(named[f"blocks.{i}.linear.weight"], named[f"blocks.{i}.linear.bias"]) for i in range(2)]
    layers.append((named["head.weight"], named["head.bias"]))
    built = builders.mlp([(w.detach().clone(), b.detach().clone()) for w, b in layers], activation, task)
    x = rand(20, 2)
    y = torch.randint(0, 3, (20,)) if task == "classification" else rand(20, 1, seed=6)
    loss = built.loss.forward(x=x, y=y)
    built.loss.backward()
    loss_fn = torch.nn.functional.cross_entropy if task == "classification" else torch.nn.functional.mse_loss
    expected = loss_fn(torch_model(x), y)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for p in built.parameters:
        assert G.relative_error(p.tensor.grad, named[p.name].grad) <= TOL, p.name


def test_gradient_descent_trajectory_equals_torch_autograd() -> None:
    """100 steps of GD on the degree-5 polynomial: engine and torch.autograd agree to 1e-12."""
    torch.manual_seed(1)
    torch_model = Polynomial(1, 5, init_scale=0.3).double()
    built = builders.polynomial([p.detach().clone() for p in torch_model.coefficients()], 1, 5)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).unsqueeze(1)
    y = 0.5 - x + 0.3 * x**3 + 0.05 * rand(64, 1, seed=8)
    engine_opt = torch.optim.SGD([p.tensor for p in built.parameters], lr=0.1)
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    for _ in range(100):
        engine_opt.zero_grad()
        built.loss.forward(x=x, y=y)
        built.loss.backward()
        engine_opt.step()
        torch_opt.zero_grad()
        torch.nn.functional.mse_loss(torch_model(x), y).backward()
        torch_opt.step()
    for p in built.parameters:
        torch.testing.assert_close(p.tensor, getattr(torch_model, p.name).detach(), rtol=1e-12, atol=1e-12)


def test_misuse_is_refused_rather_than_silently_wrong() -> None:
    a = G.Parameter(rand(3, 2), "a")
    with pytest.raises(TypeError, match="ints, slices"):
        a[[0, 0]]  # a repeated element would lose gradient
    with pytest.raises(ValueError, match="2 or more dimensions"):
        G.Graph(G.sum(a @ G.Constant(rand(2)))).forward()
    with pytest.raises(ValueError, match="equal shapes"):
        G.Graph(G.mse(a, G.Constant(rand(3)))).forward()
    with pytest.raises(RuntimeError, match="forward"):
        G.Graph(G.sum(a)).backward()
