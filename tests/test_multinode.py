"""launch/multinode.sh for real: two "nodes" on this machine (one gloo rank each, c10d rendezvous on
127.0.0.1) train as one job, equal to two ranks on one node (launch/local.sh); and when one node dies
mid-run and a replacement starts, the job resumes from its checkpoint and ends where it would have."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NO_FIGURES, REPO, Run, assert_ok, cli_env
from tests.test_elastic import RUN, children

pytestmark = pytest.mark.multiprocess

ARGS = ("trainer.progress=lines", *NO_FIGURES, *RUN)  # 420 steps, a checkpoint every 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**variables: str) -> dict[str, str]:
    # The scripts call torchrun (and python3) from PATH: this interpreter's.
    return cli_env() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | variables


class Job:
    """The nodes of one job started with launch/multinode.sh in ``cwd``; each node's output in a file."""

    def __init__(self, cwd: Path, job_id: str, **variables: str) -> None:
        self.cwd, self.job_id = cwd, job_id
        self.variables = {
            "NNODES": "2",
            "NPROC_PER_NODE": "1",
            "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
            "RDZV_ID": job_id,
        } | variables
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def run_dir(self) -> Path:
        return self.cwd / "outputs" / self.job_id  # multinode.sh names it after RDZV_ID

    def start(self, node_rank: int) -> subprocess.Popen:
        log = self.cwd / f"node{node_rank}-{len(self.nodes)}.log"
        with log.open("w") as out:
            node = subprocess.Popen(
                [str(REPO / "launch" / "multinode.sh"), *ARGS],
                cwd=self.cwd,
                env=launch_env(**self.variables, NODE_RANK=str(node_rank)),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.nodes.append(node)
        self.logs.append(log)
        return node

    def output(self) -> str:
        return "".join(f"--- {log.name}\n{log.read_text()}" for log in self.logs)

    def wait(self, timeout: float = 180) -> None:
        for node in self.nodes:
            node.wait(timeout=timeout)

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL a node: its torchrun agent and the ranks it started (torchrun gives them sessions of their own)."""
        for pid in [node.pid, *children(node.pid)]:
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.kill(pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                self.kill(node)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two gloo ranks on one node: launch/local.sh, which runs torchrun --standalone --nproc_per_node=2."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    proc = subprocess.run(
        [str(REPO / "launch" / "local.sh"), f"hydra.run.dir={run_dir}", *ARGS],
        cwd=REPO,
        env=launch_env(NPROC_PER_NODE="2"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return assert_ok(Run(proc.returncode, proc.stdout, proc.stderr, run_dir))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Run:
    job = Job(tmp_path_factory.mktemp("two-nodes"), "two-nodes")
    try:
        job.start(0)
        job.start(1)
        job.wait()
    finally:
        job.stop()
    codes = [node.returncode for node in job.nodes]
    return assert_ok(Run(0 if codes == [0, 0] else 1, job.output(), "", job.run_dir))


def test_two_nodes_train_like_two_ranks_on_one_node(two_nodes: Run, one_node: Run) -> None:
    assert two_nodes.metrics["world_size"] == 2 and two_nodes.metrics["steps"] == 420
    # Two ranks either way, and the same gloo all-reduce of two terms: bitwise equal, metrics included.
    two_nodes.assert_same_result(one_node)


def test_a_dead_node_is_replaced_and_the_job_resumes_from_its_checkpoint(tmp_path: Path, two_nodes: Run) -> None:
    # A dead node leaves the rendezvous after 3 missed heartbeats: keep_alive_interval=1 makes that 3 s, not 15.
    job = Job(tmp_path, "replaced-node", MAX_RESTARTS="1", RDZV_CONF="keep_alive_interval=1")
    try:
        job.start(0)
        doomed = job.start(1)
        latest = job.run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists():  # the first checkpoint (step 20), about 2 s before the end of training
            assert all(n.poll() is None for n in job.nodes) and time.monotonic() < deadline, job.output()[-3000:]
            time.sleep(0.02)
        job.kill(doomed)
        job.start(1)  # what a scheduler does: a new node in its place, same variables
        job.wait()
    finally:
        job.stop()
    output = job.output()
    assert [node.returncode for node in job.nodes] == [0, -signal.SIGKILL, 0], output[-3000:]
    # Node 0's agent restarted its rank (MAX_RESTARTS=1); with the new node it resumed from a checkpoint.
    (resumed,) = [line for line in output.splitlines() if line.startswith("resumed from")]
    step = int(resumed.rsplit("at step ", 1)[1].split()[0])
    assert 20 <= step < 420, resumed
    Run(0, output, "", job.run_dir).assert_same_params(two_nodes)
