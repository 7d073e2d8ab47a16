"""Small units of the trainer and dist that the end-to-end tests reach only indirectly."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dtrain import dist
from dtrain.data.dataset import Split
from dtrain.models import MLP
from dtrain.train.trainer import evaluate

ONE_PROCESS = dist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def test_chunked_evaluation_equals_one_pass() -> None:
    torch.manual_seed(0)
    model = MLP(2, [8], 3).double()
    x = torch.randn(103, 2, dtype=torch.float64)
    val = {"": Split(x, torch.randint(0, 3, (103,)))}
    whole = evaluate(model, val, "classification", ONE_PROCESS, contextlib.nullcontext, chunk=1000)
    chunked = evaluate(model, val, "classification", ONE_PROCESS, contextlib.nullcontext, chunk=7)
    assert whole.keys() == {"val/loss", "val/accuracy"}
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)
    logits = model(x)
    assert whole["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, val[""].y).item(), rel=1e-12)


def test_launch_id_ignores_a_stray_world_size(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("DTRAIN_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.under_torchrun()
    assert dist.launch_id().endswith(f"-{__import__('os').getpid():x}")


@pytest.mark.parametrize(
    ("run_id", "suffix"),
    [("fe2e7db4-39f5-445d-b8ef-c3d6b8ad35da", "-fe2e7db4"), ("job_2024_01", "-job_2024_01")],
)
def test_launch_id_under_torchrun(monkeypatch, run_id: str, suffix: str) -> None:
    monkeypatch.delenv("DTRAIN_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    assert dist.launch_id().endswith(suffix)
    monkeypatch.setenv("DTRAIN_RUN_ID", "mine")
    assert dist.launch_id() == "mine"
