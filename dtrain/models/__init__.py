"""Models built from config: a small registry from ``model.name`` to a builder, and a user's own ``_target_``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dtrain import config as C
from dtrain.data.dataset import DataSet
from dtrain.models.mlp import MLP
from dtrain.models.polynomial import Polynomial
from dtrain.models.sizes import ModelSizes
from dtrain.models.user import build_user_model


def _polynomial(cfg: C.PolynomialConfig, data: ModelSizes) -> nn.Module:
    return Polynomial(data.num_inputs, cfg.degree, data.num_outputs, init=cfg.init, init_scale=cfg.init_scale)


def _mlp(cfg: C.MLPConfig, data: ModelSizes) -> nn.Module:
    return MLP(
        data.num_inputs,
        [cfg.width] * len(cfg.hidden) if cfg.width else cfg.hidden,
        data.num_outputs,
        activation=cfg.activation,
        layer_norm=cfg.layer_norm,
        dropout=cfg.dropout,
        activation_checkpointing=cfg.activation_checkpointing,
    )


def _graph(cfg: C.GraphModelConfig, data: ModelSizes) -> nn.Module:
    """The engine's version of ``cfg.graph``, initialised exactly as the torch model of the same seed."""
    from dtrain.graph import builders
    from dtrain.models.graph import GraphModel

    if cfg.graph == "polynomial":
        reference = _polynomial(C.PolynomialConfig(degree=cfg.degree, init=cfg.init, init_scale=cfg.init_scale), data)
        coefficients = [c.detach().clone() for c in reference.coefficients()]
        return GraphModel(builders.polynomial(coefficients, data.num_inputs, cfg.degree))
    reference = _mlp(C.MLPConfig(hidden=cfg.hidden, activation=cfg.activation), data)
    named = {name: p.detach().clone() for name, p in reference.named_parameters()}
    layers = [(named[f"blocks.{i}.linear.weight"], named[f"blocks.{i}.linear.bias"]) for i in range(len(cfg.hidden))]
    layers.append((named["head.weight"], named["head.bias"]))
    return GraphModel(builders.mlp(layers, cfg.activation, data.task))


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "polynomial": _polynomial,
    "mlp": _mlp,
    "graph": _graph,
    "custom": build_user_model,
}


def model_sizes(config: C.Config, data: DataSet) -> ModelSizes:
    """What ``config``'s model is sized by on ``data``: one output per class, except one logit for binary BCE."""
    if data.task == "regression":
        y = data.train.head(1)[1]
        outputs = y.shape[1] if y.ndim > 1 else 1
    else:
        binary = isinstance(config.loss, C.LossConfig) and config.loss.name == "bce_with_logits"
        outputs = 1 if binary else data.num_classes
    return ModelSizes(data.num_inputs, outputs, data.task, data.num_classes)


def build_initial_model(config: C.Config, data: DataSet) -> nn.Module:
    """The model with its initial weights, drawn from ``init_seed`` (or ``seed``): the same on every rank."""
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    return build_model(config.model, model_sizes(config, data))


def gradient_source(model: nn.Module) -> str:
    """Where ``model``'s gradients come from: ``engine`` (dtrain's own autodiff, ``model=graph``) or
    ``autograd``. The one place the package asks which kind of model it holds; the callers pick what
    differs (the training strategy, a population's stacking) from tables keyed by this answer."""
    from dtrain.models.graph import GraphModel

    return "engine" if isinstance(model, GraphModel) else "autograd"


def build_model(cfg: object, sizes: ModelSizes) -> nn.Module:
    """Build the model that ``cfg`` names, sized by ``sizes`` (in float32, on CPU)."""
    return BUILDERS[cfg.name](cfg, sizes)  # type: ignore[attr-defined]


__all__ = [
    "BUILDERS",
    "MLP",
    "ModelSizes",
    "Polynomial",
    "build_initial_model",
    "build_model",
    "gradient_source",
    "model_sizes",
]
