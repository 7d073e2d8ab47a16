"""DOT export of engine graphs, checked structurally in Python (no Graphviz needed).

A small tokenizer and parser for the subset of DOT that ``to_dot`` writes reads the text back: it fails
on unbalanced braces or brackets, unterminated strings and statements it does not know, so the tests
see the same structure Graphviz would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch

import dtrain.graph as G
from dtrain.graph import builders
from dtrain.graph.dot import to_dot, write_dot

TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<arrow>->)|(?P<punct>[{}\[\];,=])|(?P<id>[A-Za-z_0-9.]+))')


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    end = len(text.rstrip())
    while pos < end:
        match = TOKEN.match(text, pos)
        assert match, f"cannot tokenize at {text[pos : pos + 30]!r}"
        tokens.append(match.group(match.lastgroup))
        pos = match.end()
    return tokens


def unquote(token: str) -> str:
    """The text of a DOT token: a quoted string with its escapes undone (``\\n`` is a line break)."""
    if not token.startswith('"'):
        return token
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), token[1:-1])


@dataclass
class Dot:
    graph_attrs: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    declarations: list[str] = field(default_factory=list)  # every node statement, duplicates kept


def parse(text: str) -> Dot:
    """Parse ``digraph NAME { statement; ... }`` with node, edge, default and graph-attribute statements."""
    depth = 0
    for token in tokenize(text):  # balanced braces and brackets, outside strings, never negative
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(token, 0)
        assert depth >= 0
    assert depth == 0
    tokens = tokenize(text)
    assert tokens[:3] == ["digraph", "dtrain_graph", "{"] and tokens[-1] == "}", tokens[:3]
    body, k, dot = tokens[3:-1], 0, Dot()

    def attr_list() -> dict[str, str]:
        nonlocal k
        attrs: dict[str, str] = {}
        if k < len(body) and body[k] == "[":
            k += 1
            while body[k] != "]":
                key, eq, value = body[k : k + 3]
                assert eq == "=" and key not in attrs, body[k : k + 3]
                attrs[key] = unquote(value)
                k += 3
                if body[k] == ",":
                    k += 1
            k += 1
        return attrs

    while k < len(body):
        first = body[k]
        k += 1
        if first in ("node", "edge", "graph"):
            attr_list()
        elif body[k] == "=":
            dot.graph_attrs[first] = unquote(body[k + 1])
            k += 2
        elif body[k] == "->":
            target = body[k + 1]
            k += 2
            dot.edges.append((first, target, attr_list()))
        else:
            dot.declarations.append(first)
            dot.nodes[first] = attr_list()
        assert body[k] == ";", body[k - 3 : k + 1]
        k += 1
    return dot


def label_lines(dot: Dot, node_id: str) -> list[str]:
    return dot.nodes[node_id]["label"].split("\n")


def small_graph() -> tuple[G.Graph, dict[str, torch.Tensor]]:
    """loss = mse((x @ w - b) / 2, y) + 0.1 sum(w * w): fan-out of w, non-commutative ops, a number constant."""
    x, y = G.Input("x"), G.Input("y")
    w = G.Parameter(torch.randn(3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), "w")
    b = G.Parameter(torch.zeros(1, dtype=torch.float64), "b")
    loss = G.mse((x @ w - b) / 2.0, y) + 0.1 * G.sum(w * w)
    feed = {"x": torch.ones(4, 3, dtype=torch.float64), "y": torch.zeros(4, 1, dtype=torch.float64)}
    return G.Graph(loss), feed


def node_ids(graph: G.Graph) -> dict[int, str]:
    return {id(node): f"n{k}" for k, node in enumerate(graph.order)}


def test_every_node_is_declared_once_and_every_edge_joins_declared_nodes() -> None:
    graph, _ = small_graph()
    dot = parse(to_dot(graph))
    assert dot.declarations == [f"n{k}" for k in range(len(graph.order))]  # once each, in topological order
    assert all(source in dot.nodes and target in dot.nodes for source, target, _ in dot.edges)
    ids = node_ids(graph)
    expected = {(ids[id(i)], ids[id(n)]) for n in graph.order for i in n.inputs}
    pairs = [(source, target) for source, target, _ in dot.edges]
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected  # one edge per (input, consumer) pair
    assert dot.nodes[ids[id(graph.head)]]["peripheries"] == "2"


def test_edges_show_operand_order_where_it_matters() -> None:
    graph, _ = small_graph()
    dot = parse(to_dot(graph))
    ids = node_ids(graph)
    edge_labels = {(s, t): attrs.get("label") for s, t, attrs in dot.edges}
    for node in graph.order:
        if node.op is None:
            continue
        for k, inp in enumerate(node.inputs):
            label = edge_labels[ids[id(inp)], ids[id(node)]]
            if node.kind in ("sub", "div", "matmul", "mse"):
                assert label == str(k), (node.kind, k)
            elif node.inputs.count(inp) > 1:  # w * w: one edge that feeds both slots
                assert label == "0,1"
            else:
                assert label is None, node.kind
    kinds = {node.kind for node in graph.order}
    assert {"sub", "div", "matmul", "mse", "add", "mul"} <= kinds


def test_kinds_and_names_are_shown_and_look_different() -> None:
    graph, _ = small_graph()
    dot = parse(to_dot(graph))
    ids = node_ids(graph)
    styles = {}
    for node in graph.order:
        title = label_lines(dot, ids[id(node)])[0]
        assert title.split(" ")[0] == node.kind
        if isinstance(node, (G.Input, G.Parameter)):
            assert title == f"{node.kind} {node.name}"
        attrs = dot.nodes[ids[id(node)]]
        kind = "op" if node.op is not None else node.kind
        style = (attrs["shape"], attrs["fillcolor"], attrs["style"])
        assert styles.setdefault(kind, style) == style  # one look per kind
    assert set(styles) == {"op", "input", "parameter", "constant"}
    assert len(set(styles.values())) == 4  # and no two kinds alike


def test_shapes_appear_after_forward_and_grad_norms_after_backward() -> None:
    graph, feed = small_graph()
    ids = node_ids(graph)
    before = parse(to_dot(graph))
    for node in graph.order:
        lines = label_lines(before, ids[id(node)])
        assert lines[-1] == "?" and not any(line.startswith("|grad|") for line in lines)

    graph.forward(**feed)
    after_forward = parse(to_dot(graph))
    for node in graph.order:
        lines = label_lines(after_forward, ids[id(node)])
        value = node.value
        expected = "number" if isinstance(value, float) else "[" + ", ".join(map(str, value.shape)) + "]"
        assert lines[-1] == expected, node

    graph.backward()
    after_backward = parse(to_dot(graph))
    with_grad = 0
    for node in graph.order:
        lines = label_lines(after_backward, ids[id(node)])
        if node.grad is None:
            assert not lines[-1].startswith("|grad|")
            continue
        with_grad += 1
        norm = float(lines[-1].removeprefix("|grad| "))
        assert norm == pytest.approx(node.grad.norm().item(), rel=1e-3)
    assert with_grad == sum(1 for n in graph.order if n.requires_grad)  # everything on a path to w or b
    w = next(p for p in graph.parameters if p.name == "w")
    assert f"|grad| {w.tensor.grad.norm().item():.4g}" in label_lines(after_backward, ids[id(w)])


def test_op_attributes_are_shown() -> None:
    x = G.Input("x")
    graph = G.Graph(G.mean(G.sum(x[:, 0:2] ** 3, axis=1)))
    graph.forward(x=torch.ones(5, 4))
    dot = parse(to_dot(graph))
    labels = {node.kind: label_lines(dot, f"n{k}") for k, node in enumerate(graph.order)}
    assert labels["index"] == ["index", "[:, 0:2]", "[5, 2]"]
    assert labels["pow"] == ["pow", "p=3", "[5, 2]"]
    assert labels["sum"] == ["sum", "axis=1", "[5]"]
    assert labels["mean"] == ["mean", "[]"]  # axis=None, the default, is left out


def test_quotes_backslashes_and_newlines_in_names_are_escaped() -> None:
    name = 'w "odd" \\ name\nline two'
    w = G.Parameter(torch.ones(2), name)
    graph = G.Graph(G.sum(w))
    text = to_dot(graph, title='a "quoted" title')
    dot = parse(text)  # an unescaped quote would break tokenizing or the statement structure
    assert dot.graph_attrs["label"] == 'a "quoted" title'
    assert label_lines(dot, "n0")[:2] == ['parameter w "odd" \\ name', "line two"]
    assert "\nline two" not in text  # the line break in the name is written as the escape \n


def test_ids_and_text_are_stable() -> None:
    first, _ = small_graph()
    second, _ = small_graph()
    assert to_dot(first) == to_dot(first) == to_dot(second)  # no id() or address leaks into the text


def test_builder_graphs_and_write_dot(tmp_path) -> None:
    built = builders.mlp(
        [(torch.randn(4, 2), torch.zeros(4)), (torch.randn(3, 4), torch.zeros(3))], "relu", "classification"
    )
    graph = built.loss
    graph.forward(x=torch.randn(6, 2), y=torch.tensor([0, 1, 2, 0, 1, 2]))
    graph.backward()
    path = write_dot(graph, tmp_path / "mlp.dot", title="mlp")
    text = path.read_text(encoding="utf-8")
    assert text == to_dot(graph, "mlp")
    dot = parse(text)
    assert len(dot.nodes) == len(graph.order)
    titles = {label_lines(dot, node_id)[0] for node_id in dot.nodes}
    assert {"parameter head.weight", "input y", "cross_entropy", "relu"} <= titles
    ce = graph.head
    assert (f"n{graph.order.index(ce.inputs[1])}", f"n{len(graph.order) - 1}", {"label": "1"}) in dot.edges


def test_a_long_chain_exports_quickly() -> None:
    x = G.Parameter(torch.tensor(1.0), "x")
    y: G.Node = x
    for _ in range(5000):
        y = y * 1.0
    dot = parse(to_dot(G.Graph(y)))
    assert len(dot.nodes) == 10_001 and len(dot.edges) == 10_000
