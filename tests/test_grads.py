"""Unit tests of gradient norms and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dtrain.train.grads import clip_gradients, grad_norms


def named_with_grads(*grads: torch.Tensor | None) -> list[tuple[str, nn.Parameter]]:
    named = []
    for i, grad in enumerate(grads):
        shape = grad.shape if grad is not None else (2,)
        dtype = grad.dtype if grad is not None else torch.float32
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = None if grad is None else grad.clone()
        named.append((f"p{i}", p))
    return named


def random_grads(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (), (2, 2, 2)]
    return [torch.randn(s, generator=gen, dtype=dtype) * 3 for s in shapes]


# ---------------------------------------------------------------------------------------------
# grad_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_norms_per_parameter_and_total(dtype: torch.dtype) -> None:
    grads = random_grads(1, dtype)
    norms, names = grad_norms(named_with_grads(*grads))
    assert names == ["p0", "p1", "p2", "p3"]
    assert norms.dtype == torch.float64
    assert norms.shape == (4,)
    for norm, grad in zip(norms, grads, strict=True):
        expected = math.sqrt(sum(v * v for v in grad.double().reshape(-1).tolist()))
        assert float(norm) == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)
        torch.testing.assert_close(norm, torch.linalg.vector_norm(grad).double())
    # The total norm is the norm of the per-parameter norms: the norm of all elements together.
    total = torch.linalg.vector_norm(norms)
    flat = torch.cat([g.double().reshape(-1) for g in grads])
    torch.testing.assert_close(total, torch.linalg.vector_norm(flat), rtol=1e-6, atol=0)


def test_grad_norms_skips_parameters_without_grad() -> None:
    a, c = torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    norms, names = grad_norms(named_with_grads(a, None, c))
    assert names == ["p0", "p2"]
    assert norms.tolist() == pytest.approx([5.0, 5.0])


def test_grad_norms_of_no_grads_is_empty() -> None:
    norms, names = grad_norms(named_with_grads(None, None))
    assert names == []
    assert norms.numel() == 0


def test_grad_norms_does_not_change_grads() -> None:
    grads = random_grads(2)
    named = named_with_grads(*grads)
    grad_norms(named)
    for (_, p), g in zip(named, grads, strict=True):
        assert torch.equal(p.grad, g)


# ---------------------------------------------------------------------------------------------
# clip_gradients


def params_with(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    return [p for _, p in named_with_grads(*grads)]


def global_norm(params: list[nn.Parameter]) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))


def test_clip_by_value_clamps_each_element() -> None:
    grads = random_grads(3)
    params = params_with(grads)
    max_value = 1.5
    assert any(float(g.abs().max()) > max_value for g in grads)  # the case clips something
    assert clip_gradients(params, max_value, None) is None
    for p, g in zip(params, grads, strict=True):
        expected = [min(max(v, -max_value), max_value) for v in g.reshape(-1).tolist()]
        assert p.grad.reshape(-1).tolist() == expected


def test_clip_by_norm_rescales_and_returns_pre_clip_norm() -> None:
    grads = random_grads(4)
    params = params_with(grads)
    before = global_norm(params)
    max_norm = before / 4
    returned = clip_gradients(params, None, max_norm)
    assert isinstance(returned, torch.Tensor)
    assert float(returned) == pytest.approx(before, rel=1e-12)
    assert global_norm(params) == pytest.approx(max_norm, rel=1e-6)
    # A uniform rescale: every element shrinks by the same factor, directions are kept.
    scale = max_norm / before
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-5, atol=1e-12)


def test_clip_value_then_norm() -> None:
    grads = [torch.tensor([10.0, -10.0, 0.5], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)]
    params = params_with(grads)
    returned = clip_gradients(params, 1.0, 0.5)
    # After value clipping the elements are 1, -1, 0.5, 1: norm sqrt(3.25), which is what is returned.
    after_value = math.sqrt(1 + 1 + 0.25 + 1)
    assert float(returned) == pytest.approx(after_value, rel=1e-12)
    assert global_norm(params) == pytest.approx(0.5, rel=1e-6)
    scale = 0.5 / after_value
    assert params[0].grad.tolist() == pytest.approx([scale, -scale, 0.5 * scale], rel=1e-5)


@pytest.mark.parametrize("max_value, max_norm", [(100.0, None), (None, 1000.0), (100.0, 1000.0)])
def test_clipping_under_threshold_is_a_no_op(max_value: float | None, max_norm: float | None) -> None:
    grads = random_grads(5)
    params = params_with(grads)
    assert max(float(g.abs().max()) for g in grads) < 100.0
    before = global_norm(params)
    assert before < 1000.0
    returned = clip_gradients(params, max_value, max_norm)
    for p, g in zip(params, grads, strict=True):
        assert torch.equal(p.grad, g)
    if max_norm is None:
        assert returned is None
    else:
        assert float(returned) == pytest.approx(before, rel=1e-12)


def test_no_clipping_configured_leaves_grads() -> None:
    grads = random_grads(6)
    params = params_with(grads)
    assert clip_gradients(params, None, None) is None
    for p, g in zip(params, grads, strict=True):
        assert torch.equal(p.grad, g)
