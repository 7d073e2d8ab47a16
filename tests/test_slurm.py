"""SLURM without a cluster: the environment mapping in dtrain.launch_env (node lists: dtrain.slurm_hostlist), the
hydra/launcher=slurm preset, and a real 2-rank gloo training whose two processes know their places only from
SLURM-style variables."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dtrain import dist, launch_env
from dtrain.config import load, register_configs
from dtrain.errors import UserError
from dtrain.slurm_hostlist import first_host, hostnames
from tests.conftest import REPO, Run, assert_ok, cli_env

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
SLURM_VARS = (
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_NODELIST",
)


def slurm_task(rank: int, ntasks: int = 4, **extra: str) -> dict[str, str]:
    """The variables srun gives task ``rank`` of a step of ``ntasks`` tasks, two per node."""
    env = {
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % 2),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    return env | extra


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*TORCHRUN_VARS, *SLURM_VARS, "DTRAIN_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------------------
# Node lists


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu7", ["gpu7"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("node[007]", ["node007"]),  # zero padding kept
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
        ("x-[9-10]-ib,y", ["x-9-ib", "x-10-ib", "y"]),
        (" n1 ", ["n1"]),
    ],
)
def test_nodelists_expand_in_order(nodelist: str, hosts: list[str]) -> None:
    assert list(hostnames(nodelist)) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("", "is empty"),
        ("node[1-", "unbalanced brackets"),
        ("node]1[", "unbalanced brackets"),
        ("n[[1]]", "unbalanced brackets"),
        ("a,,b", "empty host name"),
        ("n[3-1]", "bad range"),
        ("n[a-b]", "bad range"),
        ("n[]", "bad range"),
        ("n[1,]", "bad range"),
        ("n[1-2-3]", "bad range"),
    ],
)
def test_malformed_nodelists_are_one_line_user_errors(nodelist: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        first_host(nodelist)
    assert "\n" not in str(info.value)


def test_the_first_host_does_not_expand_the_whole_list_but_checks_it() -> None:
    assert first_host("n[1-99999999]") == "n1"  # hosts are made one at a time
    with pytest.raises(UserError, match="bad range"):
        first_host("a1,n[3-1]")  # a malformed name after the first is still an error


# ---------------------------------------------------------------------------------------------
# SLURM's variables -> torchrun's


def test_slurm_task_maps_to_torchruns_variables(clean_env) -> None:
    env = launch_env.slurm_env(slurm_task(3))
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(launch_env.slurm_port("4242", "0")),
    }
    # Every task of the step derives the same rendezvous address.
    assert {
        (launch_env.slurm_env(slurm_task(r))["MASTER_ADDR"], launch_env.slurm_env(slurm_task(r))["MASTER_PORT"])
        for r in range(4)
    } == {("gpu07", env["MASTER_PORT"])}


def test_the_steps_own_tasks_and_nodes_come_before_the_jobs() -> None:
    task = slurm_task(1, ntasks=8, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="gpu[12-13]")
    env = launch_env.slurm_env(task)
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("2", "gpu12")
    older = {k: v for k, v in slurm_task(0).items() if k not in ("SLURM_JOB_NODELIST", "SLURM_STEP_NUM_TASKS")}
    assert launch_env.slurm_env(older | {"SLURM_NODELIST": "old[3-4]"})["MASTER_ADDR"] == "old3"


def test_an_exported_master_address_and_port_win() -> None:
    env = launch_env.slurm_env(slurm_task(0, MASTER_ADDR="head", MASTER_PORT="29400"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29400")


@pytest.mark.parametrize(
    "environ",
    [
        {},  # not under SLURM
        slurm_task(0, ntasks=1, SLURM_STEP_NUM_TASKS="1"),  # one task: no process group
        slurm_task(1) | {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"},  # torchrun inside SLURM: torchrun's
        {k: v for k, v in slurm_task(0).items() if k != "SLURM_PROCID"},  # an allocation, not a task
    ],
)
def test_no_mapping_outside_a_multi_task_step_or_under_torchrun(environ: dict[str, str]) -> None:
    assert launch_env.slurm_env(environ) == {}


def test_ports_stay_below_the_ephemeral_range_and_differ_for_neighbours() -> None:
    ports = {launch_env.slurm_port(str(job), str(step)) for job in range(1000, 2500) for step in range(8)}
    assert len(ports) == 1500 * 8
    assert min(ports) >= 20000 and max(ports) < 32768
    assert launch_env.slurm_port("77", "") == launch_env.slurm_port("77", "batch") == launch_env.slurm_port("77", "0")
    with pytest.raises(UserError, match="SLURM_JOB_ID='' is not a job number"):
        launch_env.slurm_port("")


def test_rank_launch_id_and_the_sweep_rule_read_slurm(clean_env) -> None:
    for rank in range(4):
        for name, value in slurm_task(rank).items():
            clean_env.setenv(name, value)
        assert launch_env.rank() == rank
        assert launch_env.place() == (rank, 4, rank % 2)
        assert launch_env.under_slurm() and not launch_env.under_torchrun()
        # One run directory for every task of the step, on every node, kept when SLURM requeues the job.
        assert launch_env.launch_id() == "slurm-4242.0"
    clean_env.setenv("SLURM_PROCID", "not a number")
    assert launch_env.rank() == 0  # error reporting never fails on it; setup() reports it
    with pytest.raises(UserError, match="are not integers"):
        launch_env.place()
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "6")
    assert launch_env.rank() == 5 and not launch_env.under_slurm()  # torchrun's variables come first
    assert launch_env.place() == (5, 6, 0)


def test_setup_reports_a_malformed_slurm_environment_in_one_line(clean_env) -> None:
    for name, value in slurm_task(0, SLURM_JOB_NODELIST="gpu[1-").items():
        clean_env.setenv(name, value)
    with pytest.raises(UserError, match=r"SLURM's node list 'gpu\[1-' has unbalanced brackets"):
        dist.setup("cpu", "gloo", 5.0, 5.0)
    assert "RANK" not in os.environ  # nothing exported from a bad environment


# ---------------------------------------------------------------------------------------------
# hydra/launcher=slurm


def compose_slurm(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)


def test_the_slurm_preset_gives_each_trial_one_task_per_gpu() -> None:
    launcher = compose_slurm("hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2").hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3
    assert launcher.additional_parameters == {"requeue": True}
    assert launcher.timeout_min == 240


def test_the_slurm_preset_becomes_the_sbatch_script_we_mean(tmp_path: Path, monkeypatch) -> None:
    """Through submitit's own executor, as hydra-submitit-launcher builds it (a stand-in srun on PATH)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)

    cfg = compose_slurm("hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=str(tmp_path / "sub"), cluster="slurm", slurm_max_num_timeout=3)
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout"}
    executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items() if k not in skip})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for flag in (
        "--gpus-per-node=8",
        "--ntasks-per-node=8",  # one task (rank) per GPU
        "--nodes=1",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",  # submitit's signal, 120 s before the time limit
        "--requeue",
    ):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "\nsrun " in script


# ---------------------------------------------------------------------------------------------
# Two plain processes, SLURM's variables only: one 2-rank DDP run


COMMON = (
    "model=mlp",
    "model.hidden=[8,8]",
    "data=sine",
    "data.num_points=400",
    "optim=adam",
    "optim.lr=1e-2",
    "trainer.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.precision=float64",
    "trainer.figures=false",
    "trainer.progress=off",
    "dist.timeout_s=60",  # a rank whose peer never comes gives up well before the test's own timeout
)


def free_port_and_job_id() -> tuple[int, str, str]:
    """A job id and step id whose derived port is free here now (the test machine is shared)."""
    for job in range(1500):
        port = launch_env.slurm_port(str(job + 3000), "0")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, str(job + 3000), "0"
    raise RuntimeError("no free port in dtrain's SLURM range")


def test_two_processes_with_only_slurm_variables_train_as_two_ranks(tmp_path: Path) -> None:
    _, job_id, step_id = free_port_and_job_id()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in cli_env().items() if k not in (*TORCHRUN_VARS, *SLURM_VARS)}
        env |= {
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_JOB_ID": job_id,
            "SLURM_STEP_ID": step_id,
            "SLURM_JOB_NODELIST": "localhost",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dtrain", *COMMON],  # no hydra.run.dir: both must pick the same one
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:  # a rank that still waits for its peer after a failure
            if p.poll() is None:
                p.kill()
                p.wait()
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}.{step_id}"
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert_ok(Run(proc.returncode, out, err, run_dir))
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run_dir.name]
    run = Run(0, *outputs[0], run_dir)
    assert run.metrics["world_size"] == 2 and run.metrics["status"] == "completed"
    assert (run_dir / "logs" / "rank1.log").is_file()  # rank 1 was a rank, not a second world of one

    # The same training in this process, on one rank: DDP's averaged gradients give the same parameters.
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(COMMON))
    from dtrain.run import train

    with torch.random.fork_rng():
        summary = train(load(cfg), tmp_path / "single").summary
    assert summary["world_size"] == 1 and summary["steps"] == run.metrics["steps"] > 0
    single = torch.load(tmp_path / "single" / "model.pt")["state_dict"]
    two = run.params()
    assert single.keys() == two.keys()
    for name in single:
        torch.testing.assert_close(two[name], single[name], rtol=1e-10, atol=1e-10)


def test_sigusr2_saves_first_then_reaches_the_handler_it_displaced() -> None:
    """submitit's time-limit signal: dtrain notes it (the ranks then save a checkpoint), and on leaving
    training hands it to submitit's own handler (which requeues the job)."""
    import signal

    from dtrain.preemption import Preemption

    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        env = dist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
        with Preemption(env) as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert preemption.agreed(1) and calls == []  # ours first: the checkpoint comes before the requeue
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
