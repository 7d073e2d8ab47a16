"""dtrain's own autodiff engine, usable on its own: no Hydra, no trainer.

>>> import torch
>>> from dtrain.graph import Graph, Input, Parameter, mse
>>> x, y = Input("x"), Input("y")
>>> w = Parameter(torch.tensor([[2.0]]), "w")
>>> g = Graph(mse(x @ w, y))
>>> g.forward(x=torch.tensor([[1.0], [2.0]]), y=torch.tensor([[1.0], [2.0]]))
tensor(2.5000)
>>> g.backward(); w.tensor.grad
tensor([[5.]])
"""

from dtrain.graph.dot import to_dot, write_dot
from dtrain.graph.engine import (
    Constant,
    Graph,
    Input,
    Node,
    Op,
    Parameter,
    add,
    apply,
    cross_entropy,
    div,
    exp,
    index,
    log,
    matmul,
    mean,
    mse,
    mul,
    neg,
    power,
    relu,
    sigmoid,
    sub,
    sum,
    tanh,
    topological_order,
    transpose,
    unbroadcast,
)
from dtrain.graph.gradcheck import finite_difference_grads, gradcheck, relative_error

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
    "finite_difference_grads",
    "gradcheck",
    "index",
    "log",
    "matmul",
    "mean",
    "mse",
    "mul",
    "neg",
    "power",
    "relative_error",
    "relu",
    "sigmoid",
    "sub",
    "sum",
    "tanh",
    "to_dot",
    "topological_order",
    "transpose",
    "unbroadcast",
    "write_dot",
]
