"""Property-based tests: random expression graphs through the engine and through torch.autograd (float64).

A random program is a list of instructions (op, operand indices, attribute) over 1-3 parameters
whose shapes broadcast together. The same program is interpreted twice, once on engine nodes and
once on torch tensors, and every node's value and gradient must agree to a relative error of 1e-8
(``dtrain.graph.relative_error``). Operands are drawn from every earlier value, often the same one
twice, so intermediate nodes feed several consumers (fan-out). Values are kept away from the
singularities of the ops: a divisor, a logarithm's argument and the base of a real power always go
through a positive guard (``x*x + 1``, ``exp(tanh(x))`` or ``sigmoid(x) + 0.1``), and ``exp`` takes a
tanh-bounded argument.

Hypothesis runs derandomized with no example database, so every run (and CI) sees the same examples.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import Phase, event, find, given, settings
from hypothesis import strategies as st

import dtrain.graph as G

TOL = 1e-8  # engine against torch.autograd
FD_TOL = 1e-6  # engine against central finite differences
DTYPE = torch.float64

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None)
FEW = settings(max_examples=20, deadline=None, derandomize=True, database=None)

seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# The same program, two interpreters: one vocabulary for engine nodes and one for torch tensors.
# Arithmetic (+ - * / ** unary - and [key]) is shared: engine nodes overload the operators.


def _reduce(fn: Callable[..., Any]) -> Callable[[Any, int | None], Any]:
    return lambda x, axis: fn(x) if axis is None else fn(x, dim=axis)


ENGINE = SimpleNamespace(
    exp=G.exp,
    log=G.log,
    tanh=G.tanh,
    sigmoid=G.sigmoid,
    relu=G.relu,
    transpose=G.transpose,
    sum=G.sum,
    mean=G.mean,
    constant=G.Constant,
)
TORCH = SimpleNamespace(
    exp=torch.exp,
    log=torch.log,
    tanh=torch.tanh,
    sigmoid=torch.sigmoid,
    relu=torch.relu,
    transpose=lambda x: x.transpose(-1, -2),
    sum=_reduce(torch.sum),
    mean=_reduce(torch.mean),
    constant=lambda t: t,
)

# Positive guards: a divisor, a logarithm's argument and a real power's base go through one of these.
POSITIVE: dict[str, Callable[[Any, SimpleNamespace], Any]] = {
    "x*x+1": lambda x, ops: x * x + 1.0,
    "exp(tanh(x))": lambda x, ops: ops.exp(ops.tanh(x)),
    "sigmoid(x)+0.1": lambda x, ops: ops.sigmoid(x) + 0.1,
}
ANY_SIGN_POWERS = (0.0, 1.0, 2.0, 3.0)  # integer exponents: any base, zero included
POSITIVE_POWERS = (-2.0, -1.0, -0.5, 0.5, 1.5, 1.7, 2.5, 4.0)  # only through a positive guard

BINARY = ("add", "sub", "mul", "div")
OPS = (*BINARY, "neg", "exp", "log", "tanh", "sigmoid", "relu", "pow", "sum", "mean", "transpose", "index")
WEIGHTED_OPS = (*BINARY, *OPS)  # binary ops twice as likely: they are where shapes broadcast and values merge


@dataclass(frozen=True)
class Instr:
    """One step: ``op`` applied to the values at ``args`` (indices into all values so far)."""

    op: str
    args: tuple[int, ...]
    attr: Any = None


@dataclass(frozen=True)
class Program:
    param_shapes: tuple[tuple[int, ...], ...]
    instructions: tuple[Instr, ...]
    shapes: tuple[tuple[int, ...], ...]  # of every value: the parameters, then one per instruction
    seed: int  # parameter values and the head's weights
    scale: float  # of the parameter values
    weighted: bool  # head = sum(sink * random weights) rather than sum(sink)

    @property
    def uses(self) -> Counter:
        return Counter(a for ins in self.instructions for a in ins.args)

    @property
    def sinks(self) -> list[int]:
        """Values no instruction consumes: the head sums all of them, so every value reaches it."""
        uses = self.uses
        return [k for k in range(len(self.shapes)) if uses[k] == 0]

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        params = [torch.randn(s, generator=gen, dtype=DTYPE) * self.scale for s in self.param_shapes]
        weights = [torch.randn(self.shapes[k], generator=gen, dtype=DTYPE) for k in self.sinks]
        return params, weights


def apply_instruction(ins: Instr, values: list[Any], ops: SimpleNamespace) -> Any:
    a = values[ins.args[0]]
    b = values[ins.args[1]] if len(ins.args) > 1 else None
    op = ins.op
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        return a / POSITIVE[ins.attr](b, ops)
    if op == "neg":
        return -a
    if op == "exp":
        return ops.exp(ops.tanh(a))
    if op == "log":
        return ops.log(POSITIVE[ins.attr](a, ops))
    if op == "pow":
        p, guard = ins.attr
        return (a if guard is None else POSITIVE[guard](a, ops)) ** p
    if op in ("tanh", "sigmoid", "relu", "transpose"):
        return getattr(ops, op)(a)
    if op in ("sum", "mean"):
        return getattr(ops, op)(a, ins.attr)
    if op == "index":
        return a[ins.attr]
    raise AssertionError(op)


def interpret(program: Program, leaves: list[Any], weights: list[torch.Tensor], ops: SimpleNamespace):
    """All values of the program on ``leaves`` and the scalar head (a sum over the sinks)."""
    values = list(leaves)
    for ins in program.instructions:
        values.append(apply_instruction(ins, values, ops))
    head = None
    for k, w in zip(program.sinks, weights, strict=True):
        term = ops.sum(values[k] * ops.constant(w) if program.weighted else values[k], None)
        head = term if head is None else head + term
    return values, head


# ---------------------------------------------------------------------------------------------
# Strategies


def broadcastable_shapes(full: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every shape that broadcasts to ``full`` (a suffix of it, some dimensions set to 1), ``full`` first."""
    shapes = []
    for k in range(len(full), -1, -1):
        suffix = full[len(full) - k :]
        for keep in itertools.product((True, False), repeat=k):
            shapes.append(tuple(d if kept else 1 for d, kept in zip(suffix, keep, strict=True)))
    return shapes


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(a, b)
    except RuntimeError:
        return False
    return True


@st.composite
def programs(draw: st.DrawFn, max_params: int = 3, min_instructions: int = 3, max_instructions: int = 12) -> Program:
    full = draw(st.sampled_from([(3, 4), (2, 3, 4), (5,)]))
    shape_pool = st.sampled_from(broadcastable_shapes(full))
    param_shapes = tuple(draw(st.lists(shape_pool, min_size=1, max_size=max_params)))
    zeros = [torch.zeros(s, dtype=DTYPE) for s in param_shapes]  # to get each result's shape from torch
    instructions = []
    first = len(zeros)
    for _ in range(draw(st.integers(min_instructions, max_instructions))):
        n = len(zeros)
        # The latest value (deep chains), an earlier intermediate (fan-out) or any value at all.
        pick = draw(st.sampled_from(["latest", "intermediate", "any"]))
        if pick == "latest" or n == first:
            i = n - 1
        else:
            i = draw(st.integers(first if pick == "intermediate" else 0, n - 1))
        shape = tuple(zeros[i].shape)
        op = draw(st.sampled_from(WEIGHTED_OPS))
        if (op == "transpose" and len(shape) < 2) or (op == "index" and not shape):
            op = "tanh"
        attr: Any = None
        if op in BINARY:
            partners = [j for j in range(n) if _broadcasts(shape, tuple(zeros[j].shape))]
            args: tuple[int, ...] = (i, draw(st.sampled_from(partners)))  # i itself included: x op x
            if op == "div":
                attr = draw(st.sampled_from(sorted(POSITIVE)))
        else:
            args = (i,)
            if op == "log":
                attr = draw(st.sampled_from(sorted(POSITIVE)))
            elif op == "pow":
                if draw(st.booleans()):
                    attr = (draw(st.sampled_from(ANY_SIGN_POWERS)), None)
                else:
                    attr = (draw(st.sampled_from(POSITIVE_POWERS)), draw(st.sampled_from(sorted(POSITIVE))))
            elif op in ("sum", "mean"):
                ndim = len(shape)
                attr = draw(st.sampled_from([None, *range(ndim), *range(-ndim, 0)]))
            elif op == "index":
                axis = draw(st.integers(0, len(shape) - 1))
                size = shape[axis]
                if draw(st.booleans()):
                    item: int | slice = draw(st.integers(-size, size - 1))  # drops the axis
                else:
                    start = draw(st.integers(0, size - 1))
                    stop = draw(st.integers(start + 1, size))
                    item = slice(start, stop, draw(st.sampled_from([None, 2])))
                attr = (*(slice(None),) * axis, item)
        ins = Instr(op, args, attr)
        instructions.append(ins)
        zeros.append(apply_instruction(ins, zeros, TORCH))
    return Program(
        param_shapes=param_shapes,
        instructions=tuple(instructions),
        shapes=tuple(tuple(z.shape) for z in zeros),
        seed=draw(seeds),
        scale=draw(st.sampled_from([1.0, 0.3, 2.0])),
        weighted=draw(st.booleans()),
    )


def intermediate_fan_out(program: Program) -> int:
    """How many instruction results feed more than one consumer."""
    first = len(program.param_shapes)
    return sum(1 for k, n in program.uses.items() if k >= first and n > 1)


# ---------------------------------------------------------------------------------------------
# Random DAGs


def run_both(program: Program):
    params, weights = program.tensors()
    nodes = [G.Parameter(t.clone(), f"p{k}") for k, t in enumerate(params)]
    engine_values, engine_head = interpret(program, nodes, weights, ENGINE)
    graph = G.Graph(engine_head)
    value = graph.forward()
    graph.backward()

    leaves = [t.clone().requires_grad_() for t in params]
    torch_values, torch_head = interpret(program, leaves, weights, TORCH)
    for t in torch_values[len(leaves) :]:
        t.retain_grad()
    torch_head.backward()
    return graph, value, engine_values, torch_head.detach(), torch_values


@PROPERTY
@given(programs())
def test_random_graphs_match_torch_autograd(program: Program) -> None:
    event(f"intermediate values with fan-out: {min(intermediate_fan_out(program), 3)}")
    _, value, nodes, expected, tensors = run_both(program)
    assert value.shape == expected.shape == ()
    assert G.relative_error(value, expected) <= TOL
    for k, (node, t) in enumerate(zip(nodes, tensors, strict=True)):
        label = f"value {k} ({node.kind}, shape {tuple(t.shape)})"
        assert node.value.shape == t.shape, label
        assert G.relative_error(node.value, t.detach()) <= TOL, label
        assert t.grad is not None, label
        # A parameter's gradient lands in tensor.grad; every node keeps its own in node.grad.
        grad = node.tensor.grad if isinstance(node, G.Parameter) else node.grad
        assert grad is not None and grad.shape == t.shape, label
        assert G.relative_error(grad, t.grad) <= TOL, label


@FEW
@given(programs(max_params=2, min_instructions=2, max_instructions=6))
def test_random_graphs_match_finite_differences(program: Program) -> None:
    graph, *_ = run_both(program)
    numeric = G.finite_difference_grads(graph, {})
    for p in graph.parameters:
        assert G.relative_error(p.tensor.grad, numeric[p.name]) <= FD_TOL, p.name


def test_the_program_strategy_reaches_fan_out_reductions_and_every_op() -> None:
    """Guards the strategy itself: it can produce shared intermediates, x op x, and every op."""
    rich = find(
        programs(),
        lambda p: (
            intermediate_fan_out(p) >= 2
            and any(ins.op in BINARY and ins.args[0] == ins.args[1] for ins in p.instructions)
            and any(ins.op in ("sum", "mean") and ins.attr is not None for ins in p.instructions)
        ),
        settings=settings(max_examples=500, derandomize=True, database=None, phases=[Phase.generate]),
    )
    assert intermediate_fan_out(rich) >= 2
    seen = find(
        st.lists(programs(), min_size=20, max_size=20),
        lambda ps: {ins.op for p in ps for ins in p.instructions} == set(OPS),
        settings=settings(max_examples=50, derandomize=True, database=None, phases=[Phase.generate]),
    )
    assert {ins.op for p in seen for ins in p.instructions} == set(OPS)


# ---------------------------------------------------------------------------------------------
# Matmul chains


@st.composite
def matmul_chains(draw: st.DrawFn):
    """Factors ``(param index, transposed)``, parameter shapes, activations between products, fold order."""
    k = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(1, 5), min_size=k + 1, max_size=k + 1))
    batch = draw(st.sampled_from([(), (2,), (3,)]))
    shapes: list[tuple[int, ...]] = []
    factors: list[tuple[int, bool]] = []
    for i in range(k):
        lead = draw(st.sampled_from([(), (1,), batch])) if batch else ()
        transposed = draw(st.booleans())  # stored as [cols, rows] and used through G.transpose
        shape = (*lead, *((dims[i + 1], dims[i]) if transposed else (dims[i], dims[i + 1])))
        same = [j for j, s in enumerate(shapes) if s == shape and any(f == (j, transposed) for f in factors)]
        if same and draw(st.booleans()):
            factors.append((draw(st.sampled_from(same)), transposed))  # the same parameter again
        else:
            shapes.append(shape)
            factors.append((len(shapes) - 1, transposed))
    activations = draw(st.lists(st.sampled_from([None, "tanh", "sigmoid"]), min_size=k, max_size=k))
    return tuple(shapes), tuple(factors), tuple(activations), draw(st.sampled_from(["left", "right"]))


def matmul_chain(leaves: list[Any], chain, ops: SimpleNamespace) -> Any:
    _, factors, activations, order = chain
    mats = [ops.transpose(leaves[j]) if transposed else leaves[j] for j, transposed in factors]
    if order == "right":
        mats = mats[::-1]
    acc = mats[0]
    for mat, act in zip(mats[1:], activations, strict=False):
        acc = mat @ acc if order == "right" else acc @ mat
        if act is not None:
            acc = getattr(ops, act)(acc)
    return acc


@PROPERTY
@given(matmul_chains(), seeds)
def test_matmul_chains_match_torch_autograd(chain, seed: int) -> None:
    shapes = chain[0]
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    leaves = [t.clone().requires_grad_() for t in params]
    product = matmul_chain(leaves, chain, TORCH)
    weights = torch.randn(product.shape, generator=gen, dtype=DTYPE)
    expected = (product * weights).sum()
    expected.backward()

    nodes = [G.Parameter(t.clone(), f"m{k}") for k, t in enumerate(params)]
    graph = G.Graph(G.sum(matmul_chain(nodes, chain, ENGINE) * G.Constant(weights)))
    assert G.relative_error(graph.forward(), expected.detach()) <= TOL
    graph.backward()
    for node, leaf in zip(nodes, leaves, strict=True):
        assert G.relative_error(node.tensor.grad, leaf.grad) <= TOL, node.name


# ---------------------------------------------------------------------------------------------
# Losses


@PROPERTY
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 3),
    reduction=st.sampled_from(["mean", "sum"]),
    target_kind=st.sampled_from(["parameter", "constant", "input"]),
    coeff=st.sampled_from([1.0, -2.5, 0.1]),
    seed=seeds,
)
def test_mse_matches_torch(n: int, m: int, reduction: str, target_kind: str, coeff: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pred, target = (torch.randn(n, m, generator=gen, dtype=DTYPE) for _ in range(2))
    p = G.Parameter(pred.clone(), "pred")
    t: G.Node = {
        "parameter": lambda: G.Parameter(target.clone(), "target"),
        "constant": lambda: G.Constant(target),
        "input": lambda: G.Input("y"),
    }[target_kind]()
    graph = G.Graph(G.mse(G.tanh(p), t, reduction) * coeff)  # tanh and coeff: a non-uniform upstream grad
    value = graph.forward(**({"y": target} if target_kind == "input" else {}))
    graph.backward()

    leaf_pred = pred.clone().requires_grad_()
    leaf_target = target.clone().requires_grad_(target_kind == "parameter")
    expected = torch.nn.functional.mse_loss(torch.tanh(leaf_pred), leaf_target, reduction=reduction) * coeff
    expected.backward()
    assert G.relative_error(value, expected.detach()) <= TOL
    assert G.relative_error(p.tensor.grad, leaf_pred.grad) <= TOL
    if target_kind == "parameter":
        assert G.relative_error(t.tensor.grad, leaf_target.grad) <= TOL


@PROPERTY
@given(
    batch=st.integers(1, 6),
    classes=st.integers(2, 6),
    scale=st.sampled_from([1.0, 10.0, 30.0, 100.0, 1000.0]),
    labels_as=st.sampled_from(["constant", "input"]),
    coeff=st.sampled_from([1.0, -2.5, 0.1]),
    seed=seeds,
    data=st.data(),
)
def test_cross_entropy_matches_torch(
    batch: int, classes: int, scale: float, labels_as: str, coeff: float, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen, dtype=DTYPE) * scale  # large: only a stable lse survives
    labels = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    top = logits.argmax(dim=1)
    if bool((labels == top).all()):
        # Every row confidently right makes the loss tiny, where the engine's forward loses relative
        # precision (see test_cross_entropy_of_a_confident_correct_row_matches_torch); one wrong row
        # keeps the loss O(1) and leaves that case to the dedicated test.
        labels[0] = (top[0] + 1) % classes
    x = G.Parameter(logits.clone(), "logits")
    y: G.Node = G.Constant(labels) if labels_as == "constant" else G.Input("y")
    graph = G.Graph(G.cross_entropy(x, y) * coeff)
    value = graph.forward(**({"y": labels} if labels_as == "input" else {}))
    graph.backward()

    leaf = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(leaf, labels) * coeff
    expected.backward()
    assert G.relative_error(value, expected.detach()) <= TOL
    assert G.relative_error(x.tensor.grad, leaf.grad) <= TOL


# ---------------------------------------------------------------------------------------------
# Regressions: engine defects the properties above found (their strategies steer around these
# corners, so each keeps a minimal reproduction of its own).


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_reducing_a_scalar_along_its_axis(reduce: str, axis: int) -> None:
    x = G.Parameter(torch.tensor(1.5, dtype=DTYPE), "x")
    graph = G.Graph(G.sum(getattr(G, reduce)(x, axis) * 2.0))
    assert graph.forward().item() == 3.0
    graph.backward()
    assert x.tensor.grad.item() == 2.0


@pytest.mark.parametrize("margin", [20.0, 25.0, 30.0])
def test_cross_entropy_of_a_confident_correct_row_matches_torch(margin: float) -> None:
    logits = torch.tensor([[margin, 0.0]], dtype=DTYPE)
    labels = torch.tensor([0])
    graph = G.Graph(G.cross_entropy(G.Parameter(logits.clone(), "logits"), G.Constant(labels)))
    value = graph.forward()
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert G.relative_error(value, expected) <= TOL
