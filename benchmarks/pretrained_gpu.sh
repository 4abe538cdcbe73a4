#!/usr/bin/env bash
# Pythia-410M- and 1B-shaped random-weight checkpoints on one accelerator: forward+backward,
# EK-FAC fit of every MLP layer, pairwise scores, index build and query over 512 and 2,048
# sequences of 512 tokens, each step in its own process (resumable: WORK keeps finished steps)
# (benchmarks/pretrained.py --config gpu). PREPARED, NOT RUN: no accelerator was available
# when it was written (docs/pretrained.md says so); check the first results before use.
#
#   bash benchmarks/pretrained_gpu.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/benchmarks/pretrained-gpu.json}"
python -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" \
  || { echo "no GPU visible to jax (pip install 'jax[cuda12]')" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m benchmarks.pretrained --config gpu --work "${WORK:-runs/pretrained-gpu}" --out "$out"
