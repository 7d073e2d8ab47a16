"""The command line's overrides as Hydra should see them, for a user's own model or loss.

``model._target_=mypkg.MyNet`` is how a Hydra user names a class. The default model option (``polynomial``)
has a schema without ``_target_``, so Hydra alone would refuse the key; this module makes that override
select the ``custom`` option (an open mapping: ``_target_`` and the constructor's arguments), as if the user
had also written ``model=custom``. The same holds for ``loss`` and ``data``. Nothing else is rewritten.
"""

from __future__ import annotations

import re

from dtrain.errors import ConfigError

OPEN_GROUPS = ("model", "loss", "data")  # the groups whose options a user may replace by a _target_


def normalise(overrides: list[str]) -> list[str]:
    """``overrides`` with ``GROUP=custom`` added where ``GROUP._target_=`` appears without a ``GROUP=`` choice.

    ``+GROUP._target_=`` and ``++GROUP._target_=`` mean the same there. Raises :class:`ConfigError` for
    ``GROUP=pkg.Class`` (a class given as an option name) and for a ``_target_`` beside a built-in option.
    """
    result = list(overrides)
    for group in OPEN_GROUPS:
        target = re.compile(rf"^\+{{0,2}}{group}\._target_=")
        choice = re.compile(rf"^{group}=(.*)$")
        chosen = [m.group(1) for o in overrides if (m := choice.match(o))]
        for value in chosen:
            if "." in value and "," not in value and "/" not in value and not value.endswith(".yaml"):
                raise ConfigError(
                    f"{group}={value} is not a {group} option; for your own class use {group}._target_={value}"
                )
        if not any(target.match(o) for o in overrides):
            continue
        if chosen and any(v != "custom" for v in chosen):
            raise ConfigError(
                f"{group}._target_ replaces the built-in {group}={chosen[0]}: drop {group}={chosen[0]} "
                f"(or write your own option file, see docs/your-model.md)"
            )
        result = [o.lstrip("+") if target.match(o) else o for o in result]
        if not chosen:  # beside the _target_ override: among the overrides, wherever Hydra's flags are
            first = next(i for i, o in enumerate(result) if o.startswith(f"{group}._target_="))
            result.insert(first, f"{group}=custom")
    return result
