"""trainer.strategy=fsdp (FSDP2) through the real command line, on 2 gloo ranks in float64.

FSDP, DDP and one process train the same model on the same global batches, so they must end within
float64 rounding (1e-10) of each other, log the same TensorBoard tags, and a sharded checkpoint must
resume bitwise at 2 ranks and at 1 rank when allowed. Each torchrun launch costs seconds, so the runs are
module fixtures shared by the tests that look at them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dtrain import checkpoint
from tests.conftest import REPO, RESUMABLE_RUN, TIMING_METRICS, Run, assert_ok, main_in_process, run_dtrain
from tests.tb import scalars

pytestmark = pytest.mark.multiprocess

# The resumable MLP run (Adam, a cosine schedule, shuffled mini-batches, 7 steps an epoch) with gradient
# clipping by norm and an evaluation every 5 steps: every statistic the monitor sums over shards, and every
# piece of state a resume restores.
MLP = (
    *RESUMABLE_RUN,
    "trainer.max_epochs=2",
    "trainer.clip_grad_norm=0.5",
    "trainer.log_every=3",
    "trainer.eval_every=5",
    "checkpoint.every_n_steps=4",
)
# A user's module (tests/user_models.py), plain SGD with momentum and two micro-batches a step: its 1-row
# head leaves one rank an empty shard. 61 validation rows in chunks of 10: rank 0 evaluates 4 chunks, rank 1
# 3 (plus one on no rows, as a sharded forward must be run by every rank). Step 3's loss is NaN on one rank
# (fault.kind=nan) and the skip policy must skip it on every rank. Weight and gradient histograms.
USER = (
    "model._target_=tests.user_models.TinyNet",
    "model.width=12",
    "data=moons",
    "data.num_points=306",
    "optim=sgd",
    "optim.lr=0.2",
    "optim.momentum=0.9",
    "trainer.batch_size=40",
    "trainer.grad_accum_steps=2",
    "trainer.precision=float64",
    "trainer.max_epochs=2",
    "trainer.clip_grad_value=0.05",
    "trainer.on_nonfinite=skip",
    "fault.kind=nan",
    "fault.step=3",
    "trainer.histogram_every=5",
)
FSDP = "trainer.strategy=fsdp"
TOLERANCE = 1e-10


def assert_close(a: Run, b: Run, tolerance: float = TOLERANCE) -> None:
    """Final weights and validation/training metrics within ``tolerance`` of each other."""
    mine, theirs = a.params(), b.params()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert (mine[name] - theirs[name]).abs().max().item() <= tolerance, name
    for key in ("train/loss", "val/loss", "grad_norm/total"):
        if key in a.metrics:
            assert abs(a.metrics[key] - b.metrics[key]) <= tolerance * max(1.0, abs(b.metrics[key])), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("fsdp")
    made = {
        "fsdp": run_dtrain(root / "fsdp", *MLP, FSDP, "checkpoint.save_best=true", nproc=2),
        "ddp": run_dtrain(root / "ddp", *MLP, "checkpoint.save_best=true", nproc=2),
        "one": run_dtrain(root / "one", *MLP),
        "user_fsdp": run_dtrain(root / "user_fsdp", *USER, FSDP, "fault.rank=1", nproc=2),
        "user_ddp": run_dtrain(root / "user_ddp", *USER, "fault.rank=1", nproc=2),
        "user_one": run_dtrain(root / "user_one", *USER, "fault.rank=0"),
    }
    for run in made.values():
        assert_ok(run)
    return made


def test_fsdp_equals_ddp_and_one_process_for_the_mlp(runs: dict[str, Run]) -> None:
    assert_close(runs["fsdp"], runs["ddp"])
    assert_close(runs["fsdp"], runs["one"])
    # The same tags, with the same values: norms, update ratios and clipping summed over the shards.
    fsdp, ddp = scalars(runs["fsdp"].run_dir), scalars(runs["ddp"].run_dir)
    assert fsdp.keys() == ddp.keys()
    assert any(tag.startswith("update_ratio/") for tag in fsdp) and "train/clipped_fraction" in fsdp
    for tag in fsdp:
        if not any(timing in tag for timing in TIMING_METRICS):
            for (step, x), (step2, y) in zip(fsdp[tag], ddp[tag], strict=True):
                assert step == step2 and abs(x - y) <= 1e-6 * max(1.0, abs(y)), tag  # TensorBoard keeps float32


def test_fsdp_equals_ddp_and_one_process_for_a_user_module(runs: dict[str, Run]) -> None:
    assert_close(runs["user_fsdp"], runs["user_ddp"])
    assert_close(runs["user_fsdp"], runs["user_one"])
    assert runs["user_fsdp"].metrics["train/clipped_fraction"] > 0  # the value clipping acted, on some shard
    for name in ("user_fsdp", "user_ddp", "user_one"):
        assert runs[name].metrics["train/skipped_steps"] == 1, name  # the NaN step, skipped by every rank


def test_a_sharded_run_keeps_sharded_checkpoints_and_whole_model_files(runs: dict[str, Run]) -> None:
    run = runs["fsdp"]
    found = checkpoint.latest(run.run_dir / "checkpoints")
    assert found is not None and found.path.is_dir() and found.step == run.metrics["steps"]
    names = sorted(p.name for p in found.path.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]  # each rank wrote its own part
    manifest = json.loads(found.path.with_suffix(".json").read_text())
    assert set(manifest["files"]) == set(names) and manifest["world_size"] == 2
    # Each rank's generators under its own key (torch.distributed.checkpoint keeps one copy of a shared name).
    saved = checkpoint.shard_names(found.path)
    assert {"rank0.rng.torch", "rank1.rng.torch", "rank0.sums.loss", "rank1.sums.loss"} <= set(saved)
    # model.pt and model_best.pt hold the whole weights, as DDP's do.
    assert runs["fsdp"].params().keys() == runs["ddp"].params().keys()
    best = torch.load(run.run_dir / "model_best.pt")["state_dict"]
    assert all(best[k].shape == v.shape for k, v in runs["ddp"].params().items())


def test_dtrain_load_and_predict_read_a_sharded_checkpoint(runs: dict[str, Run], tmp_path: Path) -> None:
    import dtrain

    run = runs["fsdp"]
    found = checkpoint.latest(run.run_dir / "checkpoints")
    assert found is not None
    from_shards, final = dtrain.load(found.path), dtrain.load(run.run_dir)
    for (name, a), b in zip(from_shards.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the last checkpoint is the final step
    out = tmp_path / "p.csv"
    code, stdout, stderr = main_in_process("predict", str(found.path), "data.num_points=50", "--out", str(out))
    assert code == 0, stderr
    assert f"step {found.step} model" in stdout and len(out.read_text().splitlines()) > 1


def test_the_gloo_mean_is_a_mean_in_float32(tmp_path: Path) -> None:
    """FSDP's float32 reduce-scatter on gloo must average (PyTorch issue 162338 reported a sum): with plain SGD
    a sum would double every step, so the run would end far from one process's."""
    args = ("model=mlp", "model.hidden=[16]", "data=sine", "data.num_points=200", "optim=sgd", "optim.lr=0.1")
    args += ("trainer.batch_size=40", "trainer.max_steps=8", "trainer.precision=float32")
    sharded = assert_ok(run_dtrain(tmp_path / "fsdp", *args, FSDP, nproc=2))
    single = assert_ok(run_dtrain(tmp_path / "one", *args))
    assert_close(sharded, single, tolerance=1e-5)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded run that died after step 6 of 14; its last checkpoint is step 4's."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    run = run_dtrain(run_dir, *MLP, FSDP, "checkpoint.save_best=true", "fault.kind=exit", "fault.step=6", nproc=2)
    assert run.returncode != 0
    found = checkpoint.latest(run_dir / "checkpoints")
    assert found is not None and found.step == 4
    return run_dir


def test_a_sharded_checkpoint_resumes_bitwise_at_two_ranks(crashed: Path, runs: dict[str, Run], tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    resumed = assert_ok(run_dtrain(run_dir, *MLP, FSDP, "checkpoint.save_best=true", nproc=2))
    assert "resumed from" in resumed.stdout + resumed.stderr
    resumed.assert_same_result(runs["fsdp"])
    # Every logged value too, the resumed attempt's after the crashed one's.
    logged, whole = scalars(run_dir), scalars(runs["fsdp"].run_dir)
    for tag in ("train/loss", "grad_norm/total", "val/loss"):
        assert logged[tag] == whole[tag], tag


def test_a_sharded_checkpoint_resumes_at_one_rank_when_allowed(crashed: Path, runs: dict[str, Run], tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    refused = run_dtrain(run_dir, *MLP, FSDP, "checkpoint.save_best=true")
    assert refused.returncode == 2 and "checkpoint.allow_changes=[world_size]" in refused.stderr
    allowed = ("checkpoint.save_best=true", "checkpoint.allow_changes=[world_size]")
    resumed = assert_ok(run_dtrain(run_dir, *MLP, FSDP, *allowed))
    assert "(changed: world_size)" in resumed.stdout + resumed.stderr
    # The shards of 2 ranks resharded into one process: the same trajectory, to float64 rounding.
    assert_close(resumed, runs["fsdp"])


def test_a_corrupt_shard_is_refused_by_name(crashed: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    shard = run_dir / "checkpoints" / "step-00000004" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = run_dtrain(run_dir, *MLP, FSDP, "checkpoint.save_best=true", "checkpoint.allow_changes=[world_size]")
    assert run.returncode == 2
    assert "the SHA-256 of __1_0.distcp does not match its manifest" in run.stderr and "Traceback" not in run.stderr


SHARDED_SAVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from dtrain import checkpoint

    directory = Path(sys.argv[1])
    for step in range(1, 10_000):
        partial = checkpoint.start_sharded(directory, step)
        checkpoint.write_shards(partial, {"model": {"w": torch.full((400_000,), float(step))}})
        state, shards = {"format": checkpoint.FORMAT, "step": step}, checkpoint.shard_digests(partial, 0)
        checkpoint.finish_sharded(partial, state, step, 2, {"world_size": 1}, shards)
        if step == 1:
            print("saved", flush=True)
    """
)


def test_a_kill_at_any_instant_of_a_sharded_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """SIGKILL a process that saves sharded checkpoints in a loop, at random instants: ``latest`` always names
    a complete directory whose every file matches its manifest, and its shards load."""
    rng = random.Random(0)
    for trial in range(3):
        directory = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SHARDED_SAVER, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
        try:  # each save of the 3.2 MB shard takes some ms: kill somewhere inside one of the next ones
            proc.wait(timeout=rng.uniform(0.0, 0.4))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = checkpoint.latest(directory)
        assert found is not None and found.sharded
        state = checkpoint.load(found)  # verifies every file's size and hash
        weights = {"model": {"w": torch.empty(400_000)}}
        checkpoint.read_shards(found.path, weights)
        assert torch.equal(weights["model"]["w"], torch.full((400_000,), float(state["step"])))
        assert state["step"] == found.step


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model=polynomial",), "trainer.strategy=fsdp cannot shard this model: fully_shard splits parameters"),
        (("model=graph",), "trainer.strategy=fsdp cannot train model=graph"),
        (("model=mlp", "trainer.fsdp.wrap=[Conv2d]"), "trainer.fsdp.wrap=['Conv2d'] names no module of this model"),
        (("model=mlp", "population.size=2"), "trainer.strategy=fsdp shards one model across ranks; a population"),
        (("model=mlp", "trainer.fsdp.wrap=7"), "trainer.fsdp.wrap=7 is not blocks or a list of module class names"),
        (("model=mlp", "trainer.strategy=zero"), "trainer.strategy='zero' is not one of: ddp, fsdp"),
    ],
)
def test_what_fsdp_cannot_train_is_refused_in_one_line(overrides: tuple[str, ...], message: str, tmp_path) -> None:
    strategy = () if any(o.startswith("trainer.strategy=") for o in overrides) else (FSDP,)
    code, _, stderr = main_in_process(f"hydra.run.dir={tmp_path / 'run'}", "data=sine", *strategy, *overrides)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_lr_find_refuses_fsdp_in_one_line(tmp_path: Path) -> None:
    code, _, stderr = main_in_process("lr-find", "--out", str(tmp_path / "out"), "model=mlp", FSDP)
    assert code == 2 and "drop trainer.strategy=fsdp" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_mesh_is_on_the_training_device_even_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP's default mesh takes the machine's accelerator; dtrain's is made on the device the ranks train on."""
    import torch.distributed as torch_dist

    from dtrain.dist import DistEnv
    from dtrain.train.strategy import fsdp_mesh

    store = torch_dist.HashStore()
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        mesh = fsdp_mesh(DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
        assert mesh.device_type == "cpu"
    finally:
        torch_dist.destroy_process_group()


def test_shard_units_follow_the_wrap_rule() -> None:
    from torch import nn

    from dtrain.config import FsdpConfig
    from dtrain.models.mlp import MLP as Net
    from dtrain.train.strategy import shard_units

    net = Net(num_inputs=3, hidden=[8, 8], num_outputs=1)
    blocks = shard_units(net, FsdpConfig())
    assert blocks == [net.blocks[0], net.blocks[1], net.head]  # inside the ModuleList: it has no forward
    linears = shard_units(net, FsdpConfig(wrap=["Linear"]))
    assert len(linears) == 3 and all(isinstance(m, nn.Linear) for m in linears)
    assert linears[0] is net.head  # innermost first, as fully_shard needs: here the order is reversed


def test_rank_generators_round_trip_as_tensors() -> None:
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in the state
    state = checkpoint.rng_tensors(torch.device("cpu"))
    assert all(torch.is_tensor(v) for v in state.values())
    expected = (random.random(), torch.rand(3))
    checkpoint.set_rng_tensors(state, torch.device("cpu"))
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_a_shard_that_rank_0_was_not_told_of_stops_the_save(tmp_path: Path) -> None:
    """The manifest lists the digests every rank sends; a file DCP's index names but no rank listed (storage
    that is not shared) fails the save, and the previous checkpoint stays the latest."""
    directory = tmp_path / "checkpoints"
    partial = checkpoint.start_sharded(directory, 1)
    checkpoint.write_shards(partial, {"model": {"w": torch.ones(4)}})
    shards = checkpoint.shard_digests(partial, 0)
    first = checkpoint.finish_sharded(partial, {"format": checkpoint.FORMAT}, 1, 3, {"world_size": 1}, shards)
    partial = checkpoint.start_sharded(directory, 2)
    checkpoint.write_shards(partial, {"model": {"w": torch.ones(4)}})
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0\.distcp of step 2's checkpoint .* not listed"):
        checkpoint.finish_sharded(partial, {"format": checkpoint.FORMAT}, 2, 3, {"world_size": 1}, shards={})
    found = checkpoint.latest(directory)
    assert found is not None and found.path == first
