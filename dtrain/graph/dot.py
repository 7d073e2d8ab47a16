"""Graphviz DOT text of a :class:`~dtrain.graph.engine.Graph`, for looking at what the engine computes.

Each node of ``graph.order`` becomes one DOT node, named ``n<position in graph.order>`` (stable from one
call to the next and unique within the graph, unlike ``id()``). Its label shows the node's kind, its name,
the shape of its value once :meth:`Graph.forward` has run (``?`` before), and after :meth:`Graph.backward`
the L2 norm of ``node.grad``. Inputs, parameters, constants and operations differ in shape and colour; the
head has a double border. Edges run from an input to its consumer, one per (input, consumer) pair; where the
order of the operands matters (``sub``, ``div``, ``matmul``, ``mse`` ...) or one input fills several operand
slots (``x * x``), the edge is labelled with the operand positions it feeds, ``0``, ``1`` or ``0,1``.

The text needs nothing but this module; render it with Graphviz where that is installed
(``dot -Tsvg graph.dot -o graph.svg``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dtrain.graph.engine import Constant, Graph, Input, Node, Parameter

# Operations whose result does not depend on the order of their operands: their edges need no position.
COMMUTATIVE = frozenset({"add", "mul"})

# Node attributes by kind; operations get OP_STYLE. Shapes and fill colours keep the kinds apart.
LEAF_STYLE = {
    Input: {"shape": "box", "style": "filled,rounded", "fillcolor": "lightblue"},
    Parameter: {"shape": "box", "style": "filled", "fillcolor": "gold"},
    Constant: {"shape": "note", "style": "filled", "fillcolor": "lightgrey"},
}
OP_STYLE = {"shape": "ellipse", "style": "filled", "fillcolor": "white"}


def escape(text: str) -> str:
    """``text`` made safe inside a double-quoted DOT string: backslashes, quotes and line breaks escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")


def quote(text: str) -> str:
    """``text`` as a double-quoted DOT string."""
    return f'"{escape(text)}"'


def format_shape(value: Any) -> str:
    """``[3, 4]`` for a tensor (``[]`` for a 0-d one), ``number`` for a Python number, ``?`` for no value yet."""
    if value is None:
        return "?"
    if isinstance(value, torch.Tensor):
        return "[" + ", ".join(str(d) for d in value.shape) + "]"
    return "number"


def grad_norm(grad: torch.Tensor) -> float:
    """The L2 norm of a gradient over all its elements, in float64."""
    return torch.linalg.vector_norm(grad.detach().to(torch.float64)).item()


def _format_index(key: Any) -> str:
    """A basic index as it is written in Python: ``[:, 0:1]``, ``[..., None, 2]``."""

    def one(k: Any) -> str:
        if isinstance(k, slice):
            parts = ["" if v is None else str(v) for v in (k.start, k.stop, k.step)]
            return ":".join(parts[:2]) if k.step is None else ":".join(parts)
        return "..." if k is Ellipsis else repr(k)

    return "[" + ", ".join(one(k) for k in (key if isinstance(key, tuple) else (key,))) + "]"


def _format_attrs(attrs: dict[str, Any]) -> str:
    """An op's attributes as ``p=2, axis=1``; ``None`` values (the defaults) are left out."""
    parts = []
    for name, value in attrs.items():
        if value is None:
            continue
        if name == "index":
            parts.append(_format_index(value))
        elif isinstance(value, float):
            parts.append(f"{name}={value:g}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def node_label(node: Node) -> str:
    """A node's label, one fact a line: kind and name, an op's attributes, shape, gradient norm."""
    title = node.kind if not node.name or node.name == node.kind else f"{node.kind} {node.name}"
    lines = [title]
    attrs = _format_attrs(node.attrs) if node.op is not None else ""
    if attrs:
        lines.append(attrs)
    lines.append(format_shape(node.value))
    if isinstance(node.grad, torch.Tensor):
        lines.append(f"|grad| {grad_norm(node.grad):.4g}")
    return "\n".join(lines)


def node_style(node: Node) -> dict[str, str]:
    """Graphviz attributes that tell the kinds apart (a subclass of a leaf kind looks like its base)."""
    if node.op is None:
        for cls, style in LEAF_STYLE.items():
            if isinstance(node, cls):
                return style
    return OP_STYLE


def _attr_list(attrs: dict[str, str]) -> str:
    return "[" + ", ".join(f"{key}={quote(value)}" for key, value in attrs.items()) + "]"


def to_dot(graph: Graph, title: str = "") -> str:
    """Graphviz DOT text of ``graph``: one node per entry of ``graph.order``, one edge per (input, consumer)."""
    ids = {id(node): f"n{k}" for k, node in enumerate(graph.order)}
    lines = ["digraph dtrain_graph {", "  rankdir=LR;"]
    if title:
        lines.append(f"  label={quote(title)};")
        lines.append('  labelloc="t";')
    for node in graph.order:
        attrs = {"label": node_label(node), **node_style(node)}
        if node is graph.head:
            attrs["peripheries"] = "2"
        lines.append(f"  {ids[id(node)]} {_attr_list(attrs)};")
    for node in graph.order:
        positions: dict[int, list[int]] = {}
        for k, inp in enumerate(node.inputs):
            positions.setdefault(id(inp), []).append(k)
        labelled = node.op is not None and node.op.name not in COMMUTATIVE and len(node.inputs) > 1
        for key, slots in positions.items():
            edge = f"  {ids[key]} -> {ids[id(node)]}"
            if labelled or len(slots) > 1:
                edge += " " + _attr_list({"label": ",".join(str(s) for s in slots)})
            lines.append(edge + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(graph: Graph, path: str | Path, title: str = "") -> Path:
    """Write :func:`to_dot` of ``graph`` to ``path`` (UTF-8); return the path."""
    path = Path(path)
    path.write_text(to_dot(graph, title), encoding="utf-8")
    return path


__all__ = ["to_dot", "write_dot"]
