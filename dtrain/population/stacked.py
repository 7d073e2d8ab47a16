"""A population's models as one: every parameter stacked along a leading member axis ``[M, *shape]``.

Two ways to compute M members' losses and gradients at once:

* torch models (``polynomial``, ``mlp``): ``torch.func.functional_call`` under ``vmap``, so each layer
  becomes one batched kernel over the members (a linear layer becomes a batched matmul);
* the graph engine: the same graph built on member-stacked parameters. Its operations broadcast
  over the member axis, its losses keep it (one loss per member), and its backward fills the
  stacked gradients directly.

Members never mix: member m's loss depends only on member m's slice, so the gradient of the
summed losses with respect to the stack is each member's own gradient.

``chunk`` members go through one fused forward and backward at a time. On a GPU one chunk of all
members is best; on a CPU large members can be faster in smaller chunks (the population measures
that at start-up, see :func:`dtrain.population.chunking.pick_chunk`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dtrain.graph.builders import Built
from dtrain.train.objective import loss_fn


class StackedModel:
    """M members of one architecture: ``params[k]`` is ``[M, *shape_k]``, named ``names[k]``."""

    names: list[str]
    params: list[torch.Tensor]
    chunk: int

    @property
    def size(self) -> int:
        return self.params[0].shape[0]

    def losses_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each member's mean loss on (x, y), ``[M]``, and its gradients, stacked like ``params``."""
        losses = torch.empty(self.size, dtype=self.params[0].dtype, device=self.params[0].device)
        grads = [torch.empty_like(p) for p in self.params]
        for lo in range(0, self.size, self.chunk):
            hi = min(lo + self.chunk, self.size)
            chunk_losses, chunk_grads = self._chunk_losses_and_grads(lo, hi, x, y)
            losses[lo:hi] = chunk_losses
            for full, part in zip(grads, chunk_grads, strict=True):
                full[lo:hi] = part
        return losses, grads

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for ``x``: ``[M, N, outputs]``."""
        parts = [self._chunk_predict(lo, min(lo + self.chunk, self.size), x) for lo in range(0, self.size, self.chunk)]
        return torch.cat(parts)

    def _chunk_losses_and_grads(
        self, lo: int, hi: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def _chunk_predict(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StackedTorchModel(StackedModel):
    """Torch modules of one architecture, run as one through ``vmap(functional_call)``."""

    def __init__(self, members: list[nn.Module], task: str, chunk: int = 0) -> None:
        template = members[0]
        self.names = [name for name, _ in template.named_parameters()]
        self.params = [torch.stack([dict(m.named_parameters())[name].detach() for m in members]) for name in self.names]
        self.template = template
        self.chunk = chunk or len(members)
        compute_loss = loss_fn(task)

        def member_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return compute_loss(functional_call(template, params, (x,)), y)

        def member_output(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(template, params, (x,))

        # randomness="different": each member draws its own dropout mask, as separate runs would.
        self._grads: Callable = vmap(grad_and_value(member_loss), in_dims=(0, None, None), randomness="different")
        self._member_loss = member_loss
        self._outputs: Callable = vmap(member_output, in_dims=(0, None), randomness="different")

    def train(self, mode: bool = True) -> None:
        """Dropout on (training) or off (evaluation), as ``nn.Module.train``."""
        self.template.train(mode)

    def _slice(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {name: p[lo:hi] for name, p in zip(self.names, self.params, strict=True)}

    def _chunk_losses_and_grads(
        self, lo: int, hi: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if hi - lo == 1:  # one member: plain autograd, the cost of a single run (what chunking falls back to)
            leaves = [p[lo].detach().requires_grad_() for p in self.params]
            with torch.enable_grad():
                loss = self._member_loss(dict(zip(self.names, leaves, strict=True)), x, y)
                grads = torch.autograd.grad(loss, leaves)
            return loss.detach().unsqueeze(0), [g.unsqueeze(0) for g in grads]
        grads, losses = self._grads(self._slice(lo, hi), x, y)
        return losses, [grads[name] for name in self.names]

    def _chunk_predict(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._outputs(self._slice(lo, hi), x)


def _engine_view(stacked: torch.Tensor) -> torch.Tensor:
    """A member-stacked parameter as the engine's formulas broadcast it: a scalar ``[M]`` as ``[M, 1, 1]``,
    a bias ``[M, out]`` as ``[M, 1, out]`` (against activations ``[M, N, out]``), a matrix as it is."""
    member_shape = stacked.shape[1:]
    padding = (1,) * max(0, 2 - len(member_shape))
    return stacked.view(stacked.shape[0], *padding, *member_shape)


class StackedGraphModel(StackedModel):
    """dtrain's own engine on member-stacked parameters, one graph per chunk of members.

    ``build(parameters)`` builds the model's graph from a list of (engine-shaped) parameter tensors, as
    :mod:`dtrain.graph.builders` does for one model.
    """

    def __init__(
        self, names: list[str], params: list[torch.Tensor], build: Callable[[list[torch.Tensor]], Built], chunk: int = 0
    ) -> None:
        self.names = names
        self.params = params
        self.chunk = chunk or params[0].shape[0]
        self._build = build
        self._graphs: dict[tuple[int, int], Built] = {}

    def train(self, mode: bool = True) -> None:
        """The engine has no dropout: nothing changes between training and evaluation."""

    def _graph(self, lo: int, hi: int) -> Built:
        # Built once per chunk, on views of the stacked storage: the optimizer's in-place updates of
        # ``params`` are what the graph computes with next step.
        key = (lo, hi)
        if key not in self._graphs:
            self._graphs[key] = self._build([_engine_view(p[lo:hi]) for p in self.params])
        return self._graphs[key]

    def _chunk_losses_and_grads(
        self, lo: int, hi: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        built = self._graph(lo, hi)
        for node in built.parameters:
            node.tensor.grad = None
        losses = built.loss.forward(x=x, y=y)  # [members]: the loss keeps the member axis
        built.loss.backward(torch.ones_like(losses))
        grads = [
            node.tensor.grad.reshape(p[lo:hi].shape) for node, p in zip(built.parameters, self.params, strict=True)
        ]
        return losses, grads

    def _chunk_predict(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        return self._graph(lo, hi).prediction.forward(x=x)
