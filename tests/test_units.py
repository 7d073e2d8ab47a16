"""Small units of the trainer, dist and launch_env that the end-to-end tests reach only indirectly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dtrain import dist, launch_env
from tests.conftest import REPO, cli_env

ONE_PROCESS = dist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def test_launch_id_ignores_a_stray_world_size(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("DTRAIN_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launch_env.under_torchrun()
    assert launch_env.launch_id().endswith(f"-{__import__('os').getpid():x}")


@pytest.mark.parametrize(
    ("run_id", "suffix"),
    [("fe2e7db4-39f5-445d-b8ef-c3d6b8ad35da", "-fe2e7db4"), ("job_2024_01", "-job_2024_01")],
)
def test_launch_id_under_torchrun(monkeypatch, run_id: str, suffix: str) -> None:
    monkeypatch.delenv("DTRAIN_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    assert launch_env.launch_id().endswith(suffix)
    monkeypatch.setenv("DTRAIN_RUN_ID", "mine")
    assert launch_env.launch_id() == "mine"


# Run with torch made unimportable: the entry point and the sweep launcher read the launch environment
# (and the launcher guards against running inside torchrun) without paying for torch's import.
_WITHOUT_TORCH = """
import os
import sys
sys.modules["torch"] = None  # `import torch` (and torch.anything) now raises ImportError
from dtrain import launch_env, slurm_hostlist
from hydra.errors import HydraException
from hydra_plugins.dtrain_torchrun_launcher import torchrun_launcher
slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[3-4]"}
assert launch_env.slurm_env(slurm)["MASTER_ADDR"] == slurm_hostlist.first_host("n[3-4]") == "n3"
assert (launch_env.rank(), launch_env.place()) == (0, (0, 1, 0))
assert not launch_env.under_torchrun() and not launch_env.under_slurm()
assert launch_env.launch_id().endswith(f"-{os.getpid():x}")
os.environ["TORCHELASTIC_RUN_ID"] = "job_1"
try:
    torchrun_launcher.TorchrunLauncher().launch([["x=1"]], 0)
except HydraException as exc:
    assert "runs trials, not ranks" in str(exc), exc
else:
    raise AssertionError("a sweep inside torchrun was not refused")
assert launch_env.under_torchrun() and launch_env.launch_id().endswith("-job_1")
assert not [name for name in sys.modules if name.startswith("torch.")]
print("ok")
"""


def test_the_launch_environment_and_the_sweep_launcher_need_no_torch() -> None:
    env = {k: v for k, v in cli_env().items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DTRAIN_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
