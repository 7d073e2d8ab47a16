"""The graph engine presented as a model: its parameters are torch tensors, its gradients its own.

torch.optim, the LR schedules, clipping, logging and checkpoints see an ``nn.Module`` with
ordinary parameters. Gradients do not come from torch.autograd: :meth:`GraphModel.loss_and_backward`
runs the engine's forward and backward and leaves them in ``parameter.grad``. DDP cannot see them,
so the trainer all-reduces them itself (one bucketed call a step).
"""

from __future__ import annotations

import torch
from torch import nn

from dtrain.graph.builders import Built


class GraphModel(nn.Module):
    """Wraps a built engine graph; parameter names follow the engine's (``blocks.0.linear.weight``)."""

    def __init__(self, built: Built) -> None:
        super().__init__()
        self.built = built
        for node in built.parameters:
            if not isinstance(node.tensor, nn.Parameter):
                node.tensor = nn.Parameter(node.tensor)
            owner: nn.Module = self
            *path, leaf = node.name.split(".")
            for part in path:  # nested holders, so named_parameters() gives the engine's dotted names
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, node.tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction for ``x``, computed by the engine (no autograd graph is recorded)."""
        return self.built.prediction.forward(x=x)

    def to_dot(self, x: torch.Tensor, y: torch.Tensor) -> str:
        """Graphviz DOT of the loss graph after a forward and backward pass on (x, y), with values' shapes
        and gradient norms; parameter gradients are left cleared."""
        from dtrain.graph.dot import to_dot

        self.loss_and_backward(x, y)
        text = to_dot(self.built.loss, title="loss")
        self.zero_grad(set_to_none=True)
        return text

    def loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The loss on (x, y); its gradient times ``scale`` is *added* to each ``parameter.grad``."""
        loss = self.built.loss.forward(x=x, y=y)
        self.built.loss.backward(torch.full_like(loss, scale))
        return loss
