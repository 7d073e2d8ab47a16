#!/usr/bin/env bash
# One node of a multi-node dtrain job: start it on every node, each with its own NODE_RANK. torchrun's
# c10d rendezvous gathers the nodes, numbers the ranks and, up to MAX_RESTARTS times, restarts every
# node's workers when one of them fails; dtrain then resumes from the run directory's latest checkpoint.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 launch/multinode.sh model=mlp
#
# NNODES          number of nodes, or MIN:MAX for an elastic job (the world size may change at a restart)
# NODE_RANK       0 on the node that hosts the rendezvous at RDZV_ENDPOINT, 1, 2, ... on the others.
#                 The c10d rendezvous numbers the ranks itself: NODE_RANK only says who hosts it, which
#                 torchrun would otherwise guess by matching RDZV_ENDPOINT's host against this node's names
#                 and addresses (a guess that a service name or a NAT address defeats). Under srun it
#                 defaults to the task's SLURM_NODEID
# RDZV_ENDPOINT   HOST:PORT of node 0, reachable from every node
# RDZV_ID         the job's name, the same on every node and new for every job: it names the rendezvous
#                 and the run directory (DTRAIN_RUN_ID: outputs/RDZV_ID unless hydra.run.dir=... is given),
#                 so a restarted or replaced node finds the job's checkpoints
# NPROC_PER_NODE  ranks on this node (default: the GPUs torch sees, or 1 without GPUs)
# MAX_RESTARTS    worker-group restarts before the job fails (default 0)
# RDZV_CONF       more torchrun --rdzv-conf settings, e.g. join_timeout=900,keep_alive_interval=2
#
# The arguments are dtrain's Hydra overrides. Keep hydra.run.dir on storage every node can read.
set -euo pipefail

NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}

die() {
  echo "multinode.sh: error: $*" >&2
  exit 2
}

[[ -n ${NNODES:-} ]] || die "NNODES is not set: the number of nodes (e.g. 2), or MIN:MAX for an elastic job"
[[ -n ${NODE_RANK:-} ]] || die "NODE_RANK is not set: 0 on the node at RDZV_ENDPOINT, 1, 2, ... on the others"
[[ -n ${RDZV_ENDPOINT:-} ]] || die "RDZV_ENDPOINT is not set: HOST:PORT of node 0 (e.g. node0:29400)"
[[ -n ${RDZV_ID:-} ]] || die "RDZV_ID is not set: a name for this job, the same on every node (e.g. the scheduler's job id)"

[[ $NNODES =~ ^([1-9][0-9]*)(:([1-9][0-9]*))?$ ]] || die "NNODES=$NNODES: expected a number of nodes (2) or MIN:MAX (2:4)"
min_nodes=${BASH_REMATCH[1]}
max_nodes=${BASH_REMATCH[3]:-$min_nodes}
((min_nodes <= max_nodes)) || die "NNODES=$NNODES: MIN is larger than MAX"
if ! [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] || ((NODE_RANK >= max_nodes)); then
  die "NODE_RANK=$NODE_RANK: expected a number from 0 to $((max_nodes - 1))"
fi
[[ $RDZV_ENDPOINT =~ ^([^:]+|\[[0-9A-Fa-f:]+\]):[0-9]+$ ]] || die "RDZV_ENDPOINT=$RDZV_ENDPOINT: expected HOST:PORT"
# It becomes a directory name under outputs/.
[[ $RDZV_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "RDZV_ID=$RDZV_ID: use letters, digits, '.', '_' and '-'"
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $MAX_RESTARTS =~ ^(0|[1-9][0-9]*)$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: expected a number (0 or more)"

if [[ -z ${NPROC_PER_NODE:-} ]]; then
  gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())') ||
    die "cannot count GPUs: python3 cannot import torch (install dtrain, or set NPROC_PER_NODE)"
  NPROC_PER_NODE=$((gpus > 0 ? gpus : 1))
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a number of ranks (1 or more)"

is_host=false
if ((NODE_RANK == 0)); then
  is_host=true
fi

# Every node names the run directory after the job, whichever node's worker becomes rank 0 after a restart.
export DTRAIN_RUN_ID=${DTRAIN_RUN_ID:-$RDZV_ID}

# A new store for each attempt's workers rather than the agent's rendezvous store: with the shared one
# (torch's default), a node that replaces a dead one waits until it times out for a store address that the
# surviving rank-0 agent published for the first attempt only ("wait timeout after 60000ms, keys:
# /torch.rendezvous.<id>.1/MASTER_ADDR"), and the job cannot recover.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

overrides=()
if ((min_nodes != max_nodes)); then
  # An elastic job may restart on another world size; dtrain's data order and global batch do not depend
  # on it, so its checkpoints stay valid (keep trainer.batch_size divisible by every possible world size).
  # A checkpoint.allow_changes=[...] among the arguments replaces this one: list world_size in it too.
  overrides+=("checkpoint.allow_changes=[world_size]")
fi

command=(
  torchrun
  --nnodes="$NNODES"
  --nproc_per_node="$NPROC_PER_NODE"
  --max-restarts="$MAX_RESTARTS"
  --rdzv-backend=c10d
  --rdzv-endpoint="$RDZV_ENDPOINT"
  --rdzv-id="$RDZV_ID"
  --rdzv-conf="is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}"
  -m dtrain
  ${overrides[@]+"${overrides[@]}"}
  "$@"
)
echo "multinode.sh: node $NODE_RANK: ${command[*]}" >&2
# exec: torchrun receives the scheduler's SIGTERM itself and passes it to the workers (checkpoint, exit 75).
exec "${command[@]}"
