"""Real 2-process gloo runs through torchrun and the CLI: DDP equals one process, rank 0 alone writes."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import launch
from tests.tb import scalars

pytestmark = pytest.mark.multiprocess


def test_polynomial_ddp_with_accumulation_equals_single_process(dtrain_run) -> None:
    common = ("trainer.batch_size=120", "trainer.max_epochs=4", "trainer.precision=float64", "optim.lr=0.05")
    single = dtrain_run(*common).params()
    ddp = dtrain_run(*common, "trainer.grad_accum_steps=3", nproc=2).params()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-10)


def test_only_rank_zero_writes_and_ranks_share_one_run_dir(tmp_path) -> None:
    # No hydra.run.dir: the default outputs/<date>/<time>-<id> must be one directory for both ranks.
    proc = launch("trainer.max_epochs=3", "trainer.progress=lines", nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert len(list(run_dir.glob("events.out.tfevents*"))) >= 1
    # Every event file was written by one process (rank 0): their names end in <host>.<pid>.<n>.
    pids = {p.name.split(".")[-2] for p in run_dir.glob("events.out.tfevents*")}
    assert len(pids) == 1
    assert "train/loss" in scalars(run_dir)
    # Only rank 0 logs progress lines; rank 1 logs to its own file in the run directory.
    assert proc.stdout.count("done:") == 1
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank1.log"]
    assert "rank 1 of 2 on cpu" in (run_dir / "logs" / "rank1.log").read_text()


# A mistake found before the ranks have a process group (composing the config); those found after it (a batch
# that does not divide among the ranks) are test_bad_input.py's test_two_rank_cases.
# A bad config under torchrun, said once: test_bad_input.py's torchrun case.


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_sweep_inside_torchrun_is_refused(tmp_path) -> None:
    proc = launch("-m", "optim.lr=0.01,0.02", f"hydra.sweep.dir={tmp_path}", nproc=2, cwd=tmp_path)
    assert proc.stderr.count("dtrain: error: a sweep (-m) runs trials, not ranks") == 2  # once per trial
    assert not list(tmp_path.glob("*/metrics.json"))


def test_nccl_without_a_gpu_is_refused_before_any_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' environment, in this process: the refusal comes before the process group would wait for rank 1."""
    from dtrain import dist
    from dtrain.errors import UserError

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"^dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo"):
        dist.setup("cpu", "nccl", 5.0, 5.0)
