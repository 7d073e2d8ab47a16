"""Check a graph's gradients against central finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from dtrain.graph.engine import Graph


def central_differences(
    named: Iterable[tuple[str, torch.Tensor]], loss: Callable[[], float], eps: float = 1e-6
) -> dict[str, torch.Tensor]:
    """d(loss)/d(tensor) for each named tensor by central differences: (f(t + eps) - f(t - eps)) / 2 eps.

    ``loss()`` recomputes the scalar from the tensors' current values. Meant for float64: each element
    is nudged in place and restored. Serves the engine's graphs and torch modules alike.
    """
    grads: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in named:
            grad = torch.zeros_like(tensor)
            flat, flat_grad = tensor.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + eps
                up = loss()
                flat[i] = original - eps
                down = loss()
                flat[i] = original
                flat_grad[i] = (up - down) / (2 * eps)
            grads[name] = grad
    return grads


def finite_difference_grads(graph: Graph, feed: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """d(head)/d(parameter) for every parameter of ``graph`` by central differences."""
    return central_differences(
        ((p.name, p.tensor) for p in graph.parameters), lambda: graph.forward(**feed).item(), eps
    )


def relative_error(analytic: torch.Tensor, reference: torch.Tensor) -> float:
    """max |analytic - reference| / max |reference| (an absolute error where the reference is all zero)."""
    scale = reference.abs().max().item()
    return (analytic - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def gradcheck(graph: Graph, feed: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, float]:
    """Worst relative error of the engine's gradient for each parameter, against finite differences."""
    graph.zero_grad()
    graph.forward(**feed)
    graph.backward()
    analytic = {p.name: p.tensor.grad.clone() for p in graph.parameters}
    numeric = finite_difference_grads(graph, feed, eps)
    graph.zero_grad()
    return {name: relative_error(analytic[name], numeric[name]) for name in analytic}
