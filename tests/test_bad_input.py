"""The bad-input catalogue: each case a real command line into a run directory that already holds a
file. Each must end with one ``dtrain: error:`` line naming the bad value, a non-zero exit, no traceback
from dtrain, and the directory as it was. (More config cases: test_config.py; checkpoints: test_resume.py.)
torchrun itself turns a worker's exit status into 1 and prints its own failure summary; dtrain's part of
that output is still one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Run, run_dtrain

PRECIOUS = "an earlier run's file\n"


def run_into_existing_dir(tmp_path: Path, *overrides: str, nproc: int = 0) -> Run:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(PRECIOUS)
    return run_dtrain(run_dir, *overrides, nproc=nproc)


def assert_one_line_error(run: Run, message: str, nproc: int = 0) -> None:
    assert run.returncode == (1 if nproc else 2), run.stderr[-3000:]  # torchrun reports a failed worker as 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1, run.stderr[-3000:]  # said once, by rank 0
    assert message in errors[0], errors[0]
    frames = [line for line in run.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "/dtrain/" in f], run.stderr[-3000:]  # no traceback through dtrain's code
    if not nproc:
        assert "Traceback" not in run.stderr
    assert (run.run_dir / "metrics.json").read_text() == PRECIOUS
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["metrics.json"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_an_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    write(conf / "typo.yaml", "# @package _global_\ntrainer:\n  max_epoch: 5\n")
    run = run_into_existing_dir(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=typo")
    assert_one_line_error(run, "max_epoch")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epoch=5"], "Could not override 'trainer.max_epoch'"),
        (["+trainer.max_epoch=5"], "unknown key 'trainer.max_epoch'"),
        (["data=file"], "data.path is required"),
        (["trainer.max_epochs=ten"], "trainer.max_epochs"),
        (["trainer.log_every=-3"], "trainer.log_every=-3 must be a positive number"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be a positive number"),
        (["checkpoint.allow_changes=[model]"], "checkpoint.allow_changes: 'model' cannot change on resume"),
        (["trainer.batch_size=100000"], "trainer.batch_size=100000 is larger than the training set"),
        (["resume=/no/such/checkpoint.pt"], "resume=/no/such/checkpoint.pt: no such file or directory"),
    ],
)
def test_one_process_cases(tmp_path: Path, overrides: list[str], message: str) -> None:
    assert_one_line_error(run_into_existing_dir(tmp_path, *overrides), message)


def test_a_missing_data_file(tmp_path: Path) -> None:
    run = run_into_existing_dir(tmp_path, "data=file", f"data.path={tmp_path / 'absent.csv'}")
    assert_one_line_error(run, "no such file")


def test_a_malformed_data_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "a,y\n1,2\nthree,4\n")
    assert_one_line_error(run_into_existing_dir(tmp_path, "data=file", f"data.path={bad}"), str(bad))


# Under torchrun the mistake is every rank's, and said once, by rank 0: one launch shows it. The checks
# themselves are unit-tested (test_data.py: batch sizes at any world size; test_distributed.py: backends).
@pytest.mark.multiprocess
def test_a_mistake_under_torchrun_is_said_once(tmp_path: Path) -> None:
    run = run_into_existing_dir(tmp_path, "trainer.device=cpu", "trainer.batch_size=33", nproc=2)
    message = "trainer.batch_size=33 is not divisible by world_size x grad_accum_steps = 2 x 1"
    assert_one_line_error(run, message, 2)
    # torchrun's own failure summary (its traceback, then the failed workers) ends with dtrain's line, read from
    # the worker's error file: the last line before the summary's closing border, where a user looks first.
    last = [line for line in run.stderr.strip().splitlines() if line.strip()][-2]
    assert last.strip().startswith(f"traceback : dtrain: error: {message}"), run.stderr[-2000:]
