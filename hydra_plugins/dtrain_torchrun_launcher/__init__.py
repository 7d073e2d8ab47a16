"""A Hydra launcher that runs each trial of a sweep as its own torchrun job (torch elastic_launch).

Select it with ``hydra/launcher=torchrun``. Hydra imports every module of this package while it
discovers plugins, at the start of every ``python -m dtrain`` (every rank of every run included),
so the modules here import neither torch nor dtrain's trainer at the top: the launcher loads them
only when a sweep actually launches trials.
"""
