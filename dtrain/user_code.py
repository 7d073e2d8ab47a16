"""A user's own code, named by a dotted path (``_target_``): imported, and called with the config's arguments.

Models, losses, metrics and data sets share it (docs/your-model.md, docs/data.md). Every mistake is a
:class:`~dtrain.errors.ConfigError` of one line: the import's own message, the module's names, or the
signature's.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from dtrain.errors import ConfigError


def import_target(target: str, key: str) -> Any:
    """The object ``target`` (``pkg.module.Name``) names; a one-line error quoting the import's own message."""
    module_name, _, attr = target.rpartition(".")
    # `python -m dtrain` finds packages in the working directory; the `dtrain` console script would not.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}={target!r} cannot be imported: {exc}") from None
    except Exception as exc:  # the module itself raised while importing: still the user's to fix, in one line
        raise ConfigError(f"{key}={target!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise ConfigError(
            f"{key}={target!r}: module {module_name} has no {attr!r}; it has: {', '.join(public)}"
        ) from None


def call_with(obj: Any, args: dict[str, Any], key: str, target: str, filled: tuple[str, ...] = ()) -> Any:
    """``obj(**args)``, a mismatch between ``args`` and the signature named in one line (with what it takes).

    ``filled``: the arguments dtrain added from the data, named apart from the user's own."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as exc:
            takes = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            given = [a for a in args if a not in filled]
            from_data = f"; from the data: {', '.join(filled)}" if filled else ""
            raise ConfigError(
                f"{key}={target!r}: {exc} (given: {', '.join(given) or 'none'}{from_data}; "
                f"it takes: {', '.join(takes) or 'none'})"
            ) from None
    try:
        return obj(**args)
    except (TypeError, ValueError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise ConfigError(f"{key}={target!r}: {target}({shown}) raised {type(exc).__name__}: {exc}") from None


def instantiate_args(args: dict[str, Any], key: str) -> dict[str, Any]:
    """Arguments with nested ``{_target_: ...}`` mappings built (Hydra's ``instantiate`` vocabulary)."""
    built = {}
    for name, value in args.items():
        if isinstance(value, dict) and "_target_" in value:
            inner = {k: v for k, v in value.items() if k != "_target_"}
            sub_key = f"{key.rsplit('.', 1)[0]}.{name}._target_"
            built[name] = call_with(import_target(value["_target_"], sub_key), inner, sub_key, value["_target_"])
        else:
            built[name] = value
    return built
