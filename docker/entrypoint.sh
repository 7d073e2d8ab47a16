#!/usr/bin/env bash
# The images' entry point: docker run IMAGE [torchrun options] [--] [dtrain arguments]
#
#   docker run --gpus all IMAGE --nproc_per_node=4 model=mlp     # torchrun --nproc_per_node=4 -m dtrain model=mlp
#
# torchrun takes its own options before "-m dtrain" and hands what follows to dtrain, so the arguments are
# split: the leading ones that start with "-" are torchrun's (write them --name=value), up to the first
# other argument or a "--"; the rest are dtrain's (after "--" they may start with "-", as in -- --cfg job).
# Without options torchrun starts one rank; the PET_* variables (Kubeflow's operator sets them) give
# torchrun its defaults.
set -euo pipefail

torchrun_options=()
while (($# > 0)) && [[ $1 == -* ]]; do
  if [[ $1 == -- ]]; then
    shift
    break
  fi
  torchrun_options+=("$1")
  shift
done

# exec: torchrun becomes the container's main process and receives docker stop's SIGTERM, which it passes
# to the ranks (they save a checkpoint and exit with status 75).
exec torchrun ${torchrun_options[@]+"${torchrun_options[@]}"} -m dtrain "$@"
