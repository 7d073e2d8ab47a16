"""model=graph trains through the same trainer as the torch models, DDP-equivalent and preset-equivalent."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dtrain.dist import DistEnv, all_reduce_mean_
from tests.presets_util import TRUE_COEFFICIENTS
from tests.tb import scalars


def test_bucketed_all_reduce_is_one_collective(monkeypatch, tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: calls.append(t.numel()) or real(t, **kw))
        grads = [torch.ones(3, 2), torch.full((4,), 2.0), torch.tensor(5.0)]
        env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
        all_reduce_mean_(grads, env)  # world_size=2 in the env: the sum (of one rank) is halved
        assert calls == [11]
        assert grads[0].tolist() == [[0.5, 0.5]] * 3 and grads[1].tolist() == [1.0] * 4 and grads[2].item() == 2.5
    finally:
        dist.destroy_process_group()


# The engine's gradients all-reduced across ranks (2 ranks equal one process): tests/test_determinism.py.


def test_graph_poly2d_recovers_the_coefficients_with_the_same_tags(dtrain_run) -> None:
    run = dtrain_run("experiment=poly2d", "model=graph", "trainer.precision=float64")
    params = run.params()
    for i, want in enumerate(TRUE_COEFFICIENTS):
        assert abs(float(params[f"c{i}"]) - want) <= 0.05
    dot = (run.run_dir / "graph.dot").read_text()  # the engine's graph, after a pass: shapes and grad norms
    assert dot.startswith("digraph") and "parameter c4" in dot and "|grad|" in dot
    tags = set(scalars(run.run_dir))
    assert {"train/loss", "lr", "grad_norm/total", "perf/samples_per_sec"} <= tags
    assert {f"grad_norm/c{i}" for i in range(5)} <= tags


@pytest.mark.parametrize("preset", ["seed_good", "seed_bad", "poly2d"])
def test_every_seed_preset_has_the_same_trajectory_with_the_engine(dtrain_run, preset: str) -> None:
    common = (f"experiment={preset}", "trainer.precision=float64", "trainer.log_every=1")
    torch_run = dtrain_run(*common, "model=polynomial")
    engine_run = dtrain_run(*common, "model=graph")
    torch_loss = [v for _, v in scalars(torch_run.run_dir)["train/loss"]]
    engine_loss = [v for _, v in scalars(engine_run.run_dir)["train/loss"]]
    assert len(torch_loss) == len(engine_loss) == 300
    # TensorBoard stores float32: compare the curves at that precision, the final weights at float64's.
    assert engine_loss == pytest.approx(torch_loss, rel=1e-6)
    a, b = torch_run.params(), engine_run.params()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12)


def test_diverge_preset_diverges_at_the_same_step_with_the_engine(dtrain_run) -> None:
    """Past the stability limit rounding differences grow with the error, so compare where it diverges."""
    common = ("experiment=diverge", "trainer.log_every=1")
    torch_run = dtrain_run(*common, "model=polynomial", check=False)
    engine_run = dtrain_run(*common, "model=graph", check=False)
    assert torch_run.returncode == engine_run.returncode == 3
    assert engine_run.metrics["status"] == "diverged"
    assert engine_run.metrics["steps"] == torch_run.metrics["steps"]
    torch_loss = [v for _, v in scalars(torch_run.run_dir)["train/loss"]][:-1]  # the last one is inf
    engine_loss = [v for _, v in scalars(engine_run.run_dir)["train/loss"]][:-1]
    assert engine_loss == pytest.approx(torch_loss, rel=1e-3)
