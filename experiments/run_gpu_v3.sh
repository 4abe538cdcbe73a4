#!/usr/bin/env bash
# The v3 scale ladder (issue 26) on an accelerator, as repeated commands of at most ~10 minutes.
# NOT RUN YET: no v3 model has been trained (no accelerator was available when this was written).
#
# Each call resumes from the cache under $OUT (Trainer checkpoints, regime.json,
# v3-metrics.json, factors, scores) and stops between cached steps once $TIME_BUDGET seconds
# have passed: exit status 75 means "not finished, call again", 0 means done (results.json,
# report.md and scores.npz in $OUT; results.json and report.md copied to $PUBLISH, by default
# docs/experiments/scale-v3-gpu; the score archive stays out of git). The order is the
# design's (`python -m experiments.scale_v3 plan --config v3-gpu`): per size the learning-rate
# sweep at seed 0, then the chosen rate's other seeds, then EK-FAC at lambda x {0.1, 1, 10}
# and the identity curvature. On the GPU machine: pip install jax[cuda12] first; the corpora
# come from diatheke (.ci/apt-packages.txt), nothing is downloaded at run time.
#
#   experiments/run_gpu_v3.sh                                  # the v3-gpu ladder (small .. xxxl)
#   CONFIG=v3-tiny OUT=/tmp/t experiments/run_gpu_v3.sh        # the same script at tiny size (CPU)
#   experiments/run_gpu_v3.sh --sizes small medium --seeds 0   # any `scale_v3 run` option passes through
#   until experiments/run_gpu_v3.sh; do [ $? -eq 75 ] || exit 1; done   # where one shell may run long
set -u
cd "$(dirname "$0")/.."
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
CONFIG="${CONFIG:-v3-gpu}"
exec python -m experiments.scale_v3 run --config "$CONFIG" --time-budget "${TIME_BUDGET:-480}" \
    --out "${OUT:-runs/scale/$CONFIG}" --publish "${PUBLISH:-docs/experiments/scale-${CONFIG}}" "$@"
