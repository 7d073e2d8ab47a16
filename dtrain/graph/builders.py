"""Ready-made graphs: the polynomial models and an MLP, each with its loss.

Parameter names and layouts match the torch models in ``dtrain.models`` (``c0..cN`` for the
polynomial, ``blocks.<i>.linear.weight`` ... ``head.bias`` for the MLP), so weights copy across and
the two can be compared step by step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtrain.graph import engine as E

ACTIVATIONS = {"relu": E.relu, "tanh": E.tanh, "sigmoid": E.sigmoid}


@dataclass
class Built:
    """A model as two graphs sharing ``parameters`` (in creation order): ``loss`` (x, y) and ``prediction`` (x)."""

    loss: E.Graph
    prediction: E.Graph
    parameters: list[E.Parameter]


def with_loss(prediction: E.Node, task: str, parameters: list[E.Parameter]) -> Built:
    """Attach the task's loss (mean squared error, or softmax cross-entropy) to ``prediction``."""
    y = E.Input("y")
    loss = E.cross_entropy(prediction, y) if task == "classification" else E.mse(prediction, y)
    return Built(loss=E.Graph(loss), prediction=E.Graph(prediction), parameters=parameters)


def polynomial(coefficients: list[torch.Tensor], num_inputs: int, degree: int) -> Built:
    """sum_i sum_{p=degree..1} c x_i^p + c_const, with scalar parameters ``c0..cN`` in that term order.

    For two inputs of degree 2 this is the original example's ``c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4``.
    """
    if len(coefficients) != num_inputs * degree + 1:
        raise ValueError(f"{num_inputs} input(s) of degree {degree} need {num_inputs * degree + 1} coefficients")
    c = [E.Parameter(t, f"c{k}") for k, t in enumerate(coefficients)]
    x = E.Input("x")
    terms: list[E.Node] = []
    k = 0
    for i in range(num_inputs):
        column = x[:, i : i + 1]  # [N, 1]
        for p in range(degree, 0, -1):
            terms.append(c[k] * (column**p if p > 1 else column))
            k += 1
    prediction: E.Node = c[-1]
    for term in terms:
        prediction = term + prediction
    return with_loss(prediction, "regression", c)


def mlp(layers: list[tuple[torch.Tensor, torch.Tensor]], activation: str, task: str) -> Built:
    """An MLP from ``(weight [out, in], bias [out])`` pairs: activation after every layer but the last.

    Names follow ``dtrain.models.MLP``: hidden layers ``blocks.<i>.linear.*``, the last ``head.*``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: the graph engine has {', '.join(ACTIVATIONS)}")
    h: E.Node = E.Input("x")
    params: list[E.Parameter] = []
    for i, (weight, bias) in enumerate(layers):
        prefix = "head" if i == len(layers) - 1 else f"blocks.{i}.linear"
        w = E.Parameter(weight, f"{prefix}.weight")
        b = E.Parameter(bias, f"{prefix}.bias")
        params += [w, b]
        h = h @ E.transpose(w) + b
        if i < len(layers) - 1:
            h = ACTIVATIONS[activation](h)
    return with_loss(h, task, params)
