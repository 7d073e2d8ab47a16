"""A tensor-valued reverse-mode autodiff engine, written from scratch.

A graph is built once from nodes: :class:`Input` (data fed at each forward), :class:`Parameter`
(trainable, a torch tensor that torch.optim updates in place), :class:`Constant`, and operation
nodes made by the functions below or by arithmetic on nodes (``w * x + b``). :class:`Graph` takes
the head node, computes a topological order once (iteratively, so deep graphs do not recurse),
evaluates values in that order, and walks it backwards to push gradients to every node, summing
where a value feeds several consumers.

Every operation is an :class:`Op`: its forward and its local gradient rule stand side by side.
A backward rule gets the upstream gradient ``g``, the op's output ``z`` and its input values, and
returns one gradient per input, in the shape of the (broadcast) output. :func:`unbroadcast` then
sums each back to its input's shape: broadcasting is handled there, once, for every op.

The engine does not use torch.autograd: values are computed under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Op:
    """An operation: ``forward(*inputs, **attrs) -> z`` and ``backward(g, z, *inputs, **attrs) -> grads``."""

    name: str
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor | None, ...]]


class Node:
    """A value in the graph. Operation nodes hold their op, input nodes and attributes."""

    __slots__ = ("__weakref__", "attrs", "grad", "inputs", "name", "op", "requires_grad", "value")

    def __init__(self, op: Op | None, inputs: tuple[Node, ...] = (), attrs: dict[str, Any] | None = None) -> None:
        self.op = op
        self.inputs = inputs
        self.attrs = attrs or {}
        self.name = op.name if op else ""
        self.value: Tensor | None = None
        self.grad: Tensor | None = None
        self.requires_grad = any(i.requires_grad for i in inputs)

    @property
    def kind(self) -> str:
        return self.op.name if self.op else type(self).__name__.lower()

    def __repr__(self) -> str:
        shape = tuple(self.value.shape) if isinstance(self.value, Tensor) else None
        return f"<{self.kind} {self.name!r} shape={shape}>"

    # Arithmetic builds graph nodes, so a model is written as a formula.
    def __add__(self, other: Node | float) -> Node:
        return add(self, other)

    def __radd__(self, other: float) -> Node:
        return add(other, self)

    def __sub__(self, other: Node | float) -> Node:
        return sub(self, other)

    def __rsub__(self, other: float) -> Node:
        return sub(other, self)

    def __mul__(self, other: Node | float) -> Node:
        return mul(self, other)

    def __rmul__(self, other: float) -> Node:
        return mul(other, self)

    def __truediv__(self, other: Node | float) -> Node:
        return div(self, other)

    def __rtruediv__(self, other: float) -> Node:
        return div(other, self)

    def __neg__(self) -> Node:
        return neg(self)

    def __pow__(self, exponent: float) -> Node:
        return power(self, exponent)

    def __matmul__(self, other: Node) -> Node:
        return matmul(self, other)

    def __getitem__(self, key: Any) -> Node:
        return index(self, key)


class Input(Node):
    """Data fed to :meth:`Graph.forward` by name. ``requires_grad=True`` also collects its gradient."""

    def __init__(self, name: str, requires_grad: bool = False) -> None:
        super().__init__(None)
        self.name = name
        self.requires_grad = requires_grad


class Parameter(Node):
    """A trainable tensor. Its gradient lands in ``tensor.grad``, where torch.optim expects it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor, name: str) -> None:
        super().__init__(None)
        self.tensor = tensor
        self.name = name
        self.requires_grad = True


class Constant(Node):
    """A fixed tensor or Python number that takes part in the computation but is never trained.

    A number stays a Python number, so it combines with tensors of any dtype and device the way
    ``x * 3.0`` does in torch.
    """

    __slots__ = ("tensor",)

    def __init__(self, value: Tensor | float, name: str = "") -> None:
        super().__init__(None)
        self.tensor = value if isinstance(value, Tensor) else float(value)
        self.name = name or (f"{value:g}" if isinstance(value, float | int) else "")


def as_node(value: Node | Tensor | float) -> Node:
    return value if isinstance(value, Node) else Constant(value)


def apply(op: Op, *inputs: Node | Tensor | float, **attrs: Any) -> Node:
    """A new node computing ``op`` of ``inputs`` (numbers and tensors become constants)."""
    return Node(op, tuple(as_node(i) for i in inputs), attrs)


def unbroadcast(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` over the dimensions that broadcasting added or stretched, giving it ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    stretched = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    if stretched:
        grad = grad.sum(dim=stretched, keepdim=True)
    return grad.reshape(shape)


# ---------------------------------------------------------------------------------------------
# The operations: forward and local gradient side by side. ``g`` is dLoss/dz.


def _expand_reduced(g: Tensor, shape: torch.Size, axis: int | None) -> Tensor:
    """Undo a reduction's shape: put the reduced axis back and broadcast ``g`` over it."""
    if axis is None or len(shape) == 0:  # torch lets a 0-d value be "reduced" along axis 0 or -1
        return g.expand(shape)
    return g.unsqueeze(axis).expand(shape)


def _pow_forward(a: Tensor, *, p: float) -> Tensor:
    # Small integer exponents: exact products (torch.pow with a float exponent goes through exp/log).
    return a.pow(int(p)) if float(p).is_integer() and abs(p) <= 8 else a.pow(p)


def _pow_backward(g: Tensor, z: Tensor, a: Tensor, *, p: float) -> tuple[Tensor]:
    if p == 0:
        return (torch.zeros_like(a),)  # d/da a^0 = 0, also at a = 0 (where 0 * a^-1 would be nan)
    return (g * p * _pow_forward(a, p=p - 1),)  # a^(p-1), not z / a: exact at a = 0


def _matmul_forward(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"matmul needs operands of 2 or more dimensions, got {tuple(a.shape)} @ {tuple(b.shape)}")
    return a @ b


def _matmul_backward(g: Tensor, z: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return g @ b.transpose(-1, -2), a.transpose(-1, -2) @ g


def _index_backward(g: Tensor, z: Tensor, a: Tensor, *, index: Any) -> tuple[Tensor]:
    grad = torch.zeros_like(a)
    grad[index] = g  # basic indexing selects each element at most once, so assignment is a sum
    return (grad,)


def _loss_dims(value: Tensor, target: Tensor, what: str) -> tuple[int, ...]:
    """The trailing dimensions a loss averages over: ``target``'s. Leading dimensions of ``value`` beyond
    them (a population's member axis) are kept, giving one loss per leading index."""
    lead = value.dim() - target.dim()
    if lead < 0 or value.shape[lead:] != target.shape:  # [N, 1] against [N] would silently give [N, N]
        raise ValueError(f"{what} needs equal shapes, got {tuple(value.shape)} and {tuple(target.shape)}")
    return tuple(range(lead, value.dim()))


def _mse_forward(pred: Tensor, target: Tensor, *, reduction: str) -> Tensor:
    dims = _loss_dims(pred, target, "mse")
    squared = (pred - target).square()
    return squared.mean(dim=dims) if reduction == "mean" else squared.sum(dim=dims)


def _mse_backward(g: Tensor, z: Tensor, pred: Tensor, target: Tensor, *, reduction: str) -> tuple[Tensor, Tensor]:
    diff = pred - target
    scale = 2.0 / target.numel() if reduction == "mean" else 2.0
    grad = g.reshape(g.shape + (1,) * target.dim()) * scale * diff
    return grad, -grad


def _cross_entropy_forward(logits: Tensor, labels: Tensor) -> Tensor:
    # log-softmax of the label with the max subtracted first: no overflow for large logits, and no
    # cancellation between two large numbers when the label's logit is the largest (a tiny loss).
    _loss_dims(logits[..., 0], labels, "cross_entropy")
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_norm = shifted.exp().sum(dim=-1).log()
    picked = shifted.gather(-1, labels.expand(shifted.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (log_norm - picked).mean(dim=-1)


def _cross_entropy_backward(g: Tensor, z: Tensor, logits: Tensor, labels: Tensor) -> tuple[Tensor, None]:
    probs = (logits - logits.max(dim=-1, keepdim=True).values).softmax(dim=-1)
    probs -= torch.nn.functional.one_hot(labels, logits.shape[-1]).to(probs.dtype)  # softmax - one-hot
    return g.reshape((*g.shape, 1, 1)) * probs / len(labels), None


ADD = Op("add", lambda a, b: a + b, lambda g, z, a, b: (g, g))
SUB = Op("sub", lambda a, b: a - b, lambda g, z, a, b: (g, -g))
NEG = Op("neg", lambda a: -a, lambda g, z, a: (-g,))
MUL = Op("mul", lambda a, b: a * b, lambda g, z, a, b: (g * b, g * a))
DIV = Op("div", lambda a, b: a / b, lambda g, z, a, b: (g / b, -g * z / b))
POW = Op("pow", _pow_forward, _pow_backward)
EXP = Op("exp", torch.exp, lambda g, z, a: (g * z,))
LOG = Op("log", torch.log, lambda g, z, a: (g / a,))
TANH = Op("tanh", torch.tanh, lambda g, z, a: (g * (1 - z * z),))
SIGMOID = Op("sigmoid", torch.sigmoid, lambda g, z, a: (g * z * (1 - z),))
RELU = Op("relu", torch.relu, lambda g, z, a: (g * (a > 0).to(g.dtype),))
MATMUL = Op("matmul", _matmul_forward, _matmul_backward)
TRANSPOSE = Op("transpose", lambda a: a.transpose(-1, -2), lambda g, z, a: (g.transpose(-1, -2),))
INDEX = Op("index", lambda a, *, index: a[index], _index_backward)
SUM = Op(
    "sum",
    lambda a, *, axis: a.sum() if axis is None else a.sum(dim=axis),
    lambda g, z, a, *, axis: (_expand_reduced(g, a.shape, axis),),
)
MEAN = Op(
    "mean",
    lambda a, *, axis: a.mean() if axis is None else a.mean(dim=axis),
    lambda g, z, a, *, axis: (_expand_reduced(g, a.shape, axis) / (a.numel() // max(z.numel(), 1)),),
)
MSE = Op("mse", _mse_forward, _mse_backward)
CROSS_ENTROPY = Op("cross_entropy", _cross_entropy_forward, _cross_entropy_backward)


def add(a: Node | float, b: Node | float) -> Node:
    return apply(ADD, a, b)


def sub(a: Node | float, b: Node | float) -> Node:
    return apply(SUB, a, b)


def neg(a: Node) -> Node:
    return apply(NEG, a)


def mul(a: Node | float, b: Node | float) -> Node:
    return apply(MUL, a, b)


def div(a: Node | float, b: Node | float) -> Node:
    return apply(DIV, a, b)


def power(a: Node, exponent: float) -> Node:
    """``a ** exponent`` for a constant real exponent."""
    if isinstance(exponent, Node):
        raise TypeError("power() takes a constant exponent; for a^b with b a node, use exp(b * log(a))")
    return apply(POW, a, p=float(exponent))


def exp(a: Node) -> Node:
    return apply(EXP, a)


def log(a: Node) -> Node:
    return apply(LOG, a)


def tanh(a: Node) -> Node:
    return apply(TANH, a)


def sigmoid(a: Node) -> Node:
    return apply(SIGMOID, a)


def relu(a: Node) -> Node:
    return apply(RELU, a)


def matmul(a: Node, b: Node) -> Node:
    """Matrix product of operands with at least 2 dimensions (leading dimensions broadcast)."""
    return apply(MATMUL, a, b)


def transpose(a: Node) -> Node:
    """Swap the last two dimensions."""
    return apply(TRANSPOSE, a)


def index(a: Node, index: Any) -> Node:
    """Basic indexing and slicing (``a[:, 0:1]``, ``a[2]``, ``a[..., None]``).

    Only basic indices, which select each element at most once; lists and tensors could repeat an
    element, and the backward rule (an assignment) would then drop gradient.
    """
    parts = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in parts):
        raise TypeError(f"index() takes ints, slices, None and ... only, not {index!r}")
    return apply(INDEX, a, index=index)


def sum(a: Node, axis: int | None = None) -> Node:
    """Sum of all elements, or along ``axis`` (which is removed)."""
    return apply(SUM, a, axis=axis)


def mean(a: Node, axis: int | None = None) -> Node:
    """Mean of all elements, or along ``axis`` (which is removed)."""
    return apply(MEAN, a, axis=axis)


def mse(pred: Node, target: Node, reduction: str = "mean") -> Node:
    """Squared error of ``pred`` against ``target``, averaged (``mean``) or summed (``sum``).

    ``pred`` may have leading dimensions that ``target`` lacks (a population's member axis, ``[M, N, 1]``
    against ``[N, 1]``): the loss then has those dimensions, one value per member.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    return apply(MSE, pred, target, reduction=reduction)


def cross_entropy(logits: Node, labels: Node) -> Node:
    """Mean softmax cross-entropy of ``logits`` [B, C] against class indices ``labels`` [B]; logits
    ``[M, B, C]`` give one loss per member."""
    return apply(CROSS_ENTROPY, logits, labels)


# ---------------------------------------------------------------------------------------------


def topological_order(head: Node) -> list[Node]:
    """Every node that ``head`` depends on, each after its inputs (iterative depth-first post-order)."""
    order: list[Node] = []
    done: set[int] = set()
    stack: list[tuple[Node, bool]] = [(head, False)]
    while stack:
        node, inputs_done = stack.pop()
        if id(node) in done:
            continue
        if inputs_done:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((i, False) for i in reversed(node.inputs) if id(i) not in done)
    return order


class Graph:
    """A computation ending in ``head``: forward evaluates it, backward fills in the gradients."""

    def __init__(self, head: Node) -> None:
        self.head = head
        self.order = topological_order(head)
        self.inputs = {n.name: n for n in self.order if isinstance(n, Input)}
        self.parameters = [n for n in self.order if isinstance(n, Parameter)]
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must be unique, got {names}")

    def forward(self, **feed: Tensor) -> Tensor:
        """Evaluate every node in topological order with ``feed`` for the inputs; return the head's value."""
        missing = sorted(set(self.inputs) - set(feed))
        if missing:
            raise KeyError(f"no value fed for input(s) {missing}")
        with torch.no_grad():
            for node in self.order:
                node.grad = None  # gradients belong to the values of one pass
                if isinstance(node, Input):
                    node.value = feed[node.name]
                elif isinstance(node, (Parameter, Constant)):
                    node.value = node.tensor
                else:
                    node.value = node.op.forward(*(i.value for i in node.inputs), **node.attrs)
        return self.head.value

    def backward(self, grad: Tensor | None = None) -> None:
        """Propagate ``grad`` (default 1 for a scalar head) from the head to every node that needs it.

        Walks the topological order in reverse, so a node's gradient is complete (summed over all
        its consumers) before it is passed on. Parameter gradients accumulate into ``tensor.grad``.
        """
        head = self.head
        if head.value is None:
            raise RuntimeError("backward() needs a forward() first")
        if grad is None:
            if head.value.numel() != 1:
                raise ValueError("backward() needs a gradient for a non-scalar head")
            grad = torch.ones_like(head.value)
        grads: dict[int, Tensor] = {id(head): grad}
        with torch.no_grad():
            for node in reversed(self.order):
                g = grads.pop(id(node), None)
                if g is None:
                    continue
                node.grad = g
                if isinstance(node, Parameter):
                    t = node.tensor
                    t.grad = g.detach().clone() if t.grad is None else t.grad.add_(g)
                if node.op is None:
                    continue
                values = [i.value for i in node.inputs]
                local = node.op.backward(g, node.value, *values, **node.attrs)
                for inp, value, gi in zip(node.inputs, values, local, strict=True):
                    if gi is None or not inp.requires_grad:
                        continue
                    gi = unbroadcast(gi, value.shape)
                    key = id(inp)
                    grads[key] = grads[key] + gi if key in grads else gi  # fan-out: sum, never overwrite

    def parameter_tensors(self) -> list[Tensor]:
        return [p.tensor for p in self.parameters]

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.tensor.grad = None


__all__ = [
    "Constant",
    "Graph",
    "Input",
    "Node",
    "Op",
    "Parameter",
    "add",
    "apply",
    "cross_entropy",
    "div",
    "exp",
    "index",
    "log",
    "matmul",
    "mean",
    "mse",
    "mul",
    "neg",
    "power",
    "relu",
    "sigmoid",
    "sub",
    "sum",
    "tanh",
    "topological_order",
    "transpose",
    "unbroadcast",
]
