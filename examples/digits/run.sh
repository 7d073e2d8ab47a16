#!/usr/bin/env bash
# The digits example end to end, in a short setting (what CI runs, through tests/test_example_digits.py):
# export the data, train the CNN on 2 gloo ranks on the CPU, predict the held-out digits.
#
#   examples/digits/run.sh [OUT_DIR] [more training overrides ...]     # e.g. run.sh /tmp/digits seed=1
#
# OUT_DIR   where the data, the run directory and the predictions go (default: ./digits-out)
# EPOCHS    training epochs (default 5: about 96% validation accuracy; 30 reach about 99%)
# PYTHON    the interpreter that has dtrain and scikit-learn (default python3)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-digits-out}
if [[ $# -gt 0 ]]; then shift; fi
EPOCHS=${EPOCHS:-5}
PYTHON=${PYTHON:-python3}
# The ranks, and dtrain predict, import digits_example (the model and the loss) from here.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PYTHON" -m digits_example.data "$out/data"

# torchrun --standalone --nproc_per_node=2 -m dtrain ..., through the interpreter named above.
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m dtrain \
  "hydra.searchpath=[file://$here/conf]" \
  model=digits_cnn \
  loss=smoothed_ce \
  data=file \
  data.path="$out/data/digits.npz" \
  data.task=classification \
  "metrics=[accuracy,f1]" \
  optim=adam \
  optim.lr=3e-3 \
  trainer.device=cpu \
  trainer.max_epochs="$EPOCHS" \
  trainer.batch_size=64 \
  trainer.figures=false \
  hydra.run.dir="$out/run" \
  "$@"

"$PYTHON" -m dtrain predict "$out/run" data.path="$out/data/new_digits.npz" --out "$out/predictions.csv"
