"""The launcher's settings, registered in Hydra's ConfigStore as ``hydra/launcher=torchrun``.

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module before it is in
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class TorchrunLauncherConf:
    """``hydra.launcher.*``: how each trial's torchrun job is started (the names of torchrun's options)."""

    _target_: str = "hydra_plugins.dtrain_torchrun_launcher.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 2  # ranks of each trial on this machine
    nnodes: str = "1"  # "N" or "MIN:MAX"; more than one node needs rdzv_endpoint=HOST:PORT (docs/tuning.md)
    max_restarts: int = 0  # torchrun restarts of a failed trial (it resumes from its checkpoint)
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = "localhost:0"  # a standalone rendezvous on a free local port, new for each trial
    rdzv_configs: dict[str, Any] = field(default_factory=dict)  # e.g. {timeout: 900}
    monitor_interval: float = 0.1  # seconds between the agent's checks of its workers
    log_dir: str | None = None  # torchelastic's per-rank files; None: a temporary directory removed after each trial


ConfigStore.instance().store(
    group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="dtrain_torchrun_launcher"
)
