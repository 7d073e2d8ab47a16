"""A user's own model: ``model._target_`` imported and called with the arguments beside it (docs/your-model.md).

The contract, in one place: the target is a ``torch.nn.Module`` subclass, or a function that returns one. Its
constructor's ``num_inputs`` and ``num_outputs`` parameters, where it has them and the config does not set
them, are filled from the data (features per row; targets per row for regression, classes for
classification, 1 for ``loss=bce_with_logits``). A value that is itself a mapping with ``_target_`` is built
first, as Hydra's ``instantiate`` does. Every mistake is a :class:`~dtrain.errors.ConfigError` of one line.
"""

from __future__ import annotations

import inspect

from torch import nn

from dtrain.config import UserModelConfig
from dtrain.errors import ConfigError
from dtrain.models.sizes import ModelSizes
from dtrain.user_code import call_with, import_target, instantiate_args

FILLED_FROM_DATA = ("num_inputs", "num_outputs")


def build_user_model(cfg: UserModelConfig, sizes: ModelSizes) -> nn.Module:
    """The module ``cfg`` names, sized for the data where its constructor asks (``num_inputs``, ``num_outputs``)."""
    key, target = "model._target_", cfg.target
    factory = import_target(target, key)
    if inspect.isclass(factory) and not issubclass(factory, nn.Module):
        raise ConfigError(f"{key}={target!r} is a class but not a torch.nn.Module; dtrain trains nn.Module subclasses")
    if not callable(factory):
        raise ConfigError(f"{key}={target!r} is a {type(factory).__name__}, not an nn.Module class or a factory")
    args = instantiate_args(cfg.args, key)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    filled = tuple(name for name in FILLED_FROM_DATA if name in parameters and name not in args)
    args.update({name: getattr(sizes, name) for name in filled})
    model = call_with(factory, args, key, target, filled)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}={target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{key}={target!r} has no trainable parameters: there is nothing to train")
    return model
