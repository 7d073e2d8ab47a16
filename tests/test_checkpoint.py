"""Checkpoint files: atomic saves that survive a kill at any instant, pruning, finding, strict loading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dtrain import checkpoint
from dtrain.checkpoint import CheckpointError, Found

REPO = Path(__file__).resolve().parents[1]


def state(step: int, size: int = 10) -> dict:
    """A small checkpoint state whose content identifies its step."""
    return {"format": checkpoint.FORMAT, "step": step, "weights": torch.full((size,), float(step))}


def save(directory: Path, step: int, keep_last: int = 3, size: int = 10) -> Path:
    return checkpoint.save(directory, state(step, size), step, keep_last, {"world_size": 1})


def test_save_writes_the_file_its_manifest_and_latest(tmp_path: Path) -> None:
    path = save(tmp_path, 7)
    assert path.name == "step-00000007.pt"
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest == json.loads((tmp_path / "latest").read_text())
    assert manifest["step"] == 7 and manifest["size"] == path.stat().st_size
    assert {"sha256", "time", "dtrain_version", "world_size"} <= set(manifest)
    found = checkpoint.latest(tmp_path)
    assert found is not None and found.path == path
    assert torch.equal(checkpoint.load(found)["weights"], torch.full((10,), 7.0))


def test_only_the_last_k_are_kept(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20, 25):
        save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000020.pt", "step-00000025.pt"]
    assert sorted(p.name for p in tmp_path.glob("step-*.json")) == ["step-00000020.json", "step-00000025.json"]


def test_a_flipped_byte_is_caught_by_the_hash(tmp_path: Path) -> None:
    path = save(tmp_path, 3, size=1000)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load itself would read this file without complaint
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(checkpoint.latest(tmp_path))


def test_a_truncated_file_is_refused_with_or_without_a_manifest(tmp_path: Path) -> None:
    path = save(tmp_path, 3, size=1000)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(checkpoint.latest(tmp_path))
    with pytest.raises(CheckpointError, match="unreadable, truncated or not a checkpoint"):
        checkpoint.load(Found(path, None, None, None))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not a dtrain checkpoint"):
        checkpoint.load(checkpoint.find(str(other), tmp_path))


def test_find_resolves_auto_never_and_paths(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert checkpoint.find("auto", run_dir) is None
    save(run_dir / checkpoint.DIR_NAME, 4)
    newest = save(run_dir / checkpoint.DIR_NAME, 8)
    assert checkpoint.find("never", run_dir) is None
    assert checkpoint.find("auto", run_dir).path == newest
    assert checkpoint.find(str(run_dir), tmp_path).path == newest  # a run directory
    assert checkpoint.find(str(run_dir / "checkpoints"), tmp_path).path == newest
    older = checkpoint.find(str(run_dir / "checkpoints" / "step-00000004.pt"), tmp_path)
    assert older.step == 4 and older.sha256 is not None  # its manifest is used to verify it
    with pytest.raises(CheckpointError, match="no such file or directory"):
        checkpoint.find(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.find(str(tmp_path), tmp_path / "elsewhere")


def test_config_changes_name_the_difference_and_the_way_out() -> None:
    saved = {"model": {"name": "mlp", "hidden": [16]}, "optim": {"lr": 0.1}, "trainer": {"log_every": 10}}
    path = Path("ck.pt")
    changed_log = saved | {"trainer": {"log_every": 99}}
    assert checkpoint.config_changes(saved, changed_log, 2, 2, [], path) == []  # logging may always change
    with pytest.raises(CheckpointError, match=r"model.hidden was \[16\], now \[32\].*cannot change on resume"):
        checkpoint.config_changes(saved, saved | {"model": {"name": "mlp", "hidden": [32]}}, 2, 2, [], path)
    new_lr = saved | {"optim": {"lr": 0.05}}
    with pytest.raises(CheckpointError, match=r"optim.lr was 0.1, now 0.05.*allow_changes=\[optim.lr\]"):
        checkpoint.config_changes(saved, new_lr, 2, 2, [], path)
    assert checkpoint.config_changes(saved, new_lr, 2, 2, ["optim.lr"], path) == ["optim.lr"]
    with pytest.raises(CheckpointError, match=r"world_size was 2, now 4.*allow_changes=\[world_size\]"):
        checkpoint.config_changes(saved, saved, 2, 4, [], path)
    assert checkpoint.config_changes(saved, saved, 2, 4, ["world_size"], path) == ["world_size"]


# A process that saves checkpoints of growing step numbers as fast as it can, until it is killed.
SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from dtrain import checkpoint
    directory = Path(sys.argv[1])
    step = 0
    while True:
        step += 1
        state = {"format": checkpoint.FORMAT, "step": step, "weights": torch.full((200_000,), float(step))}
        checkpoint.save(directory, state, step, 2, {"world_size": 1})
        if step == 1:
            print("saved", flush=True)
    """
)


def test_a_kill_at_any_instant_of_saving_leaves_a_loadable_latest(tmp_path: Path) -> None:
    """SIGKILL a process that saves in a loop, at random instants: ``latest`` always names a whole file."""
    rng = random.Random(0)
    for trial in range(4):
        directory = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
        # Each save of the 1.6 MB state takes a few ms: kill somewhere inside one of the next saves.
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.3))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = checkpoint.latest(directory)
        assert found is not None
        loaded = checkpoint.load(found)  # verifies size and hash
        assert torch.equal(loaded["weights"], torch.full((200_000,), float(loaded["step"])))
        assert loaded["step"] == found.step


def test_a_data_file_checkpoint_from_before_the_new_data_keys_resumes_as_it_trained(tmp_path) -> None:
    """A data=file run saved before data.features/drop/labels/num_workers/standardize existed: the keys it lacks
    read as what it did (no standardisation), so it resumes with data.standardize=false and is refused, by name,
    with today's default (standardised), which would train on other inputs."""
    from dtrain.checkpoint import CheckpointError, config_changes
    from dtrain.config import Config, FileDataConfig, to_plain

    current = to_plain(Config(data=FileDataConfig(path="/d.csv", standardize=False)))
    saved = to_plain(Config(data=FileDataConfig(path="/d.csv")))
    for key in ("features", "drop", "labels", "num_workers", "standardize"):
        del saved["data"][key]
    assert config_changes(saved, current, 1, 1, [], tmp_path / "c.pt") == []
    current["data"]["standardize"] = True
    with pytest.raises(CheckpointError, match=r"saved before data.standardize existed, .* add data.standardize=false"):
        config_changes(saved, current, 1, 1, [], tmp_path / "c.pt")


def test_a_user_functions_own_path_argument_is_compared_as_given(tmp_path) -> None:
    """Only data=file's data.path is stored resolved and compared so; a data._target_ function's own `path`
    argument is the function's, compared as the user wrote it."""
    from dtrain.checkpoint import config_changes
    from dtrain.config import Config, UserDataConfig, to_plain

    config = to_plain(Config(data=UserDataConfig(target="pkg.load", args={"path": "data/train.csv"})))
    assert config_changes(config, config, 1, 1, [], tmp_path / "c.pt") == []
