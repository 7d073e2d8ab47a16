"""Models built from config: a small registry from ``model.name`` to a builder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dtrain import config as C
from dtrain.data.dataset import DataSet
from dtrain.models.mlp import MLP
from dtrain.models.polynomial import Polynomial


def _polynomial(cfg: C.PolynomialConfig, data: DataSet) -> nn.Module:
    return Polynomial(data.num_inputs, cfg.degree, data.num_outputs, init=cfg.init, init_scale=cfg.init_scale)


def _mlp(cfg: C.MLPConfig, data: DataSet) -> nn.Module:
    return MLP(
        data.num_inputs,
        cfg.hidden,
        data.num_outputs,
        activation=cfg.activation,
        layer_norm=cfg.layer_norm,
        dropout=cfg.dropout,
        activation_checkpointing=cfg.activation_checkpointing,
    )


BUILDERS: dict[str, Callable[..., nn.Module]] = {"polynomial": _polynomial, "mlp": _mlp}


def build_model(cfg: object, data: DataSet) -> nn.Module:
    """Build the model that ``cfg`` names, sized for ``data``'s inputs and outputs (in float32, on CPU)."""
    return BUILDERS[cfg.name](cfg, data)  # type: ignore[attr-defined]


__all__ = ["BUILDERS", "MLP", "Polynomial", "build_model"]
