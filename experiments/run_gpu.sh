#!/usr/bin/env bash
# The v2 scale ladder on an accelerator, as repeated commands of at most ~10 minutes.
#
# Each call resumes from the cache under $OUT and stops between cached steps once
# $TIME_BUDGET seconds have passed: exit status 75 means "not finished, call again",
# 0 means done (results.json and report.md written, and copied to $PUBLISH, by default
# docs/experiments/scale-v2-gpu: then `python -m experiments.render` puts the report into
# docs/experiments/scale.md). On the GPU machine: pip install jax[cuda12] first.
#
#   experiments/run_gpu.sh                       # the gpu ladder (small .. xxl, 3 seeds)
#   CONFIG=tiny OUT=/tmp/t experiments/run_gpu.sh  # the same script at tiny size (CPU, the test)
#   until experiments/run_gpu.sh; do [ $? -eq 75 ] || exit 1; done   # where one shell may run long
set -u
cd "$(dirname "$0")/.."
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
CONFIG="${CONFIG:-gpu}"
exec python -m experiments.scale_comparison --config "$CONFIG" --time-budget "${TIME_BUDGET:-480}" \
    --out "${OUT:-runs/scale/$CONFIG}" --publish "${PUBLISH:-docs/experiments/scale-v2-$CONFIG}" "$@"
