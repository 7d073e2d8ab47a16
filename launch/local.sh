#!/usr/bin/env bash
# dtrain on this machine: one rank per GPU (NCCL), or 2 gloo ranks on a machine without GPUs.
#
#   launch/local.sh model=mlp optim=adam trainer.max_epochs=50     # the arguments are Hydra overrides
#
# NPROC_PER_NODE  ranks to start (default: the GPUs torch sees, or 2 without GPUs)
# MAX_RESTARTS    restarts of the ranks when one fails, each resuming from the latest checkpoint (default 0)
set -euo pipefail

die() {
  echo "local.sh: error: $*" >&2
  exit 2
}

if [[ -z ${NPROC_PER_NODE:-} ]]; then
  gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())') ||
    die "cannot count GPUs: python3 cannot import torch (install dtrain, or set NPROC_PER_NODE)"
  NPROC_PER_NODE=$((gpus > 0 ? gpus : 2))
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a number of ranks (1 or more)"
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $MAX_RESTARTS =~ ^(0|[1-9][0-9]*)$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: expected a number (0 or more)"

# --standalone: a private rendezvous on a free port, so two jobs on one machine do not meet.
# exec: torchrun receives SIGTERM itself and passes it to the ranks (checkpoint, exit 75).
exec torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS" -m dtrain "$@"
