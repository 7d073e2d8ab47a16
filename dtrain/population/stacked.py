"""A population's models as one: every parameter stacked along a leading member axis ``[M, *shape]``.

Two ways to compute M members' losses and gradients at once:

* torch models (``polynomial``, ``mlp``): ``torch.func.functional_call`` under ``vmap``, so each layer
  becomes one batched kernel over the members; a plain MLP is written out as one ``baddbmm`` a layer,
  which is faster still;
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
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dtrain.graph.builders import Built
from dtrain.models.mlp import MLP
from dtrain.train.objective import Loss


class StackedModel:
    """M members of one architecture: ``params[k]`` is ``[M, *shape_k]``, named ``names[k]``."""

    names: list[str]
    params: list[torch.Tensor]
    chunk: int
    loss: Loss  # what each member's loss is (evaluation sums it over rows)

    @property
    def size(self) -> int:
        return self.params[0].shape[0]

    def losses_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each member's mean loss on (x, y), ``[M]``, and its gradients, stacked like ``params``."""
        if self.chunk >= self.size:  # one fused pass: its results are the whole population's
            return self.chunk_losses_and_grads(0, self.size, x, y)
        losses = torch.empty(self.size, dtype=self.params[0].dtype, device=self.params[0].device)
        grads = [torch.empty_like(p) for p in self.params]
        for lo in range(0, self.size, self.chunk):
            hi = min(lo + self.chunk, self.size)
            chunk_losses, chunk_grads = self.chunk_losses_and_grads(lo, hi, x, y)
            losses[lo:hi] = chunk_losses
            for full, part in zip(grads, chunk_grads, strict=True):
                full[lo:hi] = part
        return losses, grads

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for ``x``: ``[M, N, outputs]``."""
        parts = [self._chunk_predict(lo, min(lo + self.chunk, self.size), x) for lo in range(0, self.size, self.chunk)]
        return torch.cat(parts)

    def train(self, mode: bool = True) -> None:
        """Training mode (dropout on) or evaluation mode, as ``nn.Module.train``."""
        raise NotImplementedError

    def chunk_losses_and_grads(
        self, lo: int, hi: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Losses and gradients of members ``lo`` to ``hi`` (one fused pass), shaped ``[hi - lo, ...]``."""
        raise NotImplementedError

    def _chunk_predict(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


ACTIVATION_FUNCTIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.GELU: F.gelu,
    nn.SiLU: F.silu,
}


def batched_mlp(template: nn.Module) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """For a plain ``MLP`` (no LayerNorm, dropout or checkpointing): its forward on member-stacked weights as
    one ``baddbmm`` a layer, about a quarter faster than ``vmap`` over ``functional_call`` on a CPU. None for
    any other model (``vmap`` serves those)."""
    if not isinstance(template, MLP) or template.activation_checkpointing:
        return None
    if any(
        b.norm is not None or b.drop is not None or type(b.act) not in ACTIVATION_FUNCTIONS for b in template.blocks
    ):
        return None
    activation = ACTIVATION_FUNCTIONS[type(template.blocks[0].act)]
    layers = len(template.blocks) + 1

    def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # params: weight [m, out, in], bias [m, out] per layer, in named_parameters() order.
        h = x.expand(params[0].shape[0], *x.shape)
        for i in range(layers):
            weight, bias = params[2 * i], params[2 * i + 1]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if i < layers - 1:
                h = activation(h)
        return h

    return forward


class StackedTorchModel(StackedModel):
    """Torch modules of one architecture, run as one: plain MLPs through batched matmuls, any other model
    through ``vmap(functional_call)``."""

    def __init__(self, members: list[nn.Module], loss: Loss, chunk: int = 0) -> None:
        template = members[0]
        self.names = [name for name, _ in template.named_parameters()]
        self.params = [torch.stack([dict(m.named_parameters())[name].detach() for m in members]) for name in self.names]
        self.template = template
        self.chunk = chunk or len(members)
        self.loss = loss
        compute_loss = loss.fn

        def member_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return compute_loss(functional_call(template, params, (x,)), y)

        def member_output(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(template, params, (x,))

        # randomness="different": each member draws its own dropout mask, as separate runs would.
        self._grads: Callable = vmap(grad_and_value(member_loss), in_dims=(0, None, None), randomness="different")
        self._outputs: Callable = vmap(member_output, in_dims=(0, None), randomness="different")
        self._batched = batched_mlp(template)
        self._compute_loss = compute_loss
        self._member_losses = loss.members

    def train(self, mode: bool = True) -> None:
        """Dropout on (training) or off (evaluation), as ``nn.Module.train``."""
        self.template.train(mode)

    def _slice(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {name: p[lo:hi] for name, p in zip(self.names, self.params, strict=True)}

    def chunk_losses_and_grads(
        self, lo: int, hi: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if hi - lo == 1:
            # One member: the template module itself, pointed at the member's weights (views, no copy), and a
            # plain backward: what a single run does, so chunking can fall back to the cost of running alone.
            own = [param for _, param in self.template.named_parameters()]
            for param, stacked in zip(own, self.params, strict=True):
                param.data = stacked[lo]
                param.grad = None
            with torch.enable_grad():
                loss = self._compute_loss(self.template(x), y)
                loss.backward()
            return loss.detach().unsqueeze(0), [param.grad.unsqueeze(0) for param in own]
        if self._batched is not None:
            leaves = [p[lo:hi].detach().requires_grad_() for p in self.params]
            with torch.enable_grad():
                losses = self._member_losses(self._batched(leaves, x), y)
                # Member m's loss depends on member m's slice only: the gradient of the sum is each one's own.
                grads = torch.autograd.grad(losses.sum(), leaves)
            return losses.detach(), list(grads)
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
        self,
        names: list[str],
        params: list[torch.Tensor],
        build: Callable[[list[torch.Tensor]], Built],
        loss: Loss,
        chunk: int = 0,
    ) -> None:
        self.loss = loss  # what the engine's own graph computes (mse or cross_entropy): for evaluation
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

    def chunk_losses_and_grads(
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
