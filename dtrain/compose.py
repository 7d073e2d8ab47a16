"""Where the config tree lives, and composing a checked config from overrides without starting a job.

The training entry point (``dtrain.__main__``) hands the tree to ``hydra.main``; the subcommands
(``dtrain gradcheck``, ``dtrain lr-find``) and the tests compose the same config with :func:`compose_config`.
"""

from __future__ import annotations

from pathlib import Path

from dtrain.config import Config, load, register_configs
from dtrain.overrides import normalise


def config_dir() -> str:
    """The config tree: inside the installed package (wheel, container), else the source checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "config.yaml").is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str]) -> Config:
    """The checked config that ``python -m dtrain OVERRIDES`` would run, composed without starting a job
    (for the subcommands, which take the same overrides as training)."""
    from hydra import compose, initialize_config_dir

    register_configs()  # the schemas the tree's defaults name (base_trainer, ...)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return load(compose(config_name="config", overrides=normalise(list(overrides))))
