"""Synthetic data sets, each a pure function of its config and a seeded generator."""

from __future__ import annotations

import math

import torch

from dtrain import config as C
from dtrain.data.dataset import DataSet, Split, split_train_val


def poly2d(cfg: C.Poly2dConfig, gen: torch.Generator) -> DataSet:
    """The original example's grid: y = c0 x1^2 + c1 x1 + c2 x2^2 + c3 x2 + c4 + N(0, noise^2)."""
    axis = torch.linspace(cfg.low, cfg.high, cfg.grid_size, dtype=torch.float64)
    x1, x2 = torch.meshgrid(axis, axis, indexing="ij")
    x = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1)
    c = torch.tensor(cfg.coefficients, dtype=torch.float64)
    clean = c[0] * x[:, 0] ** 2 + c[1] * x[:, 0] + c[2] * x[:, 1] ** 2 + c[3] * x[:, 1] + c[4]
    y = (clean + cfg.noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)).unsqueeze(1)
    train, val = split_train_val(x, y, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task="regression", extras={"coefficients": list(cfg.coefficients)})


def poly1d(cfg: C.Poly1dConfig, gen: torch.Generator) -> DataSet:
    """y = k0 + k1 x + ... + k_d x^d + N(0, noise^2), x uniform in [low, high]."""
    if cfg.coefficients is None:
        k = 2 * torch.rand(cfg.degree + 1, generator=gen, dtype=torch.float64) - 1
    else:
        k = torch.tensor(cfg.coefficients, dtype=torch.float64)
    x = cfg.low + (cfg.high - cfg.low) * torch.rand(cfg.num_points, 1, generator=gen, dtype=torch.float64)
    powers = x ** torch.arange(cfg.degree + 1, dtype=torch.float64)
    y = powers @ k.unsqueeze(1) + cfg.noise * torch.randn(cfg.num_points, 1, generator=gen, dtype=torch.float64)
    train, val = split_train_val(x, y, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task="regression", extras={"coefficients": k.tolist()})


def sine(cfg: C.SineConfig, gen: torch.Generator) -> DataSet:
    """A noisy sine: train/val inside [low, high]; ``outer`` holds points beyond it, for extrapolation."""
    num_outer = round(cfg.outer_fraction * cfg.num_points)
    num_inner = cfg.num_points - num_outer
    inner = cfg.low + (cfg.high - cfg.low) * torch.rand(num_inner, 1, generator=gen, dtype=torch.float64)
    # Outer points: uniform over the two flanks [outer_low, low) and [high, outer_high).
    left, right = cfg.low - cfg.outer_low, cfg.outer_high - cfg.high
    u = (left + right) * torch.rand(num_outer, 1, generator=gen, dtype=torch.float64)
    outer = torch.where(u < left, cfg.outer_low + u, cfg.high + (u - left))

    def target(x: torch.Tensor) -> torch.Tensor:
        noise = cfg.noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        return torch.sin(cfg.frequency * x) + noise

    train, val = split_train_val(inner, target(inner), cfg.val_fraction, gen)
    return DataSet(train, {"": val, "outer": Split(outer, target(outer))}, task="regression")


def moons(cfg: C.MoonsConfig, gen: torch.Generator) -> DataSet:
    """Two interleaving half circles with Gaussian noise; class 0 on top, class 1 below."""
    n0 = cfg.num_points // 2
    n1 = cfg.num_points - n0
    t0 = math.pi * torch.rand(n0, generator=gen, dtype=torch.float64)
    t1 = math.pi * torch.rand(n1, generator=gen, dtype=torch.float64)
    top = torch.stack([torch.cos(t0), torch.sin(t0)], dim=1)
    bottom = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], dim=1)
    x = torch.cat([top, bottom]) + cfg.noise * torch.randn(cfg.num_points, 2, generator=gen, dtype=torch.float64)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    train, val = split_train_val(x, y, cfg.val_fraction, gen)
    return DataSet(train, {"": val}, task="classification", num_classes=2)
