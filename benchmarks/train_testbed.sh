#!/usr/bin/env bash
# Learned selectors on the Fashion-MNIST testbed at ≈ −35% and ≈ −50% MACs (issue 4's acceptance runs).
# Usage: benchmarks/train_testbed.sh [device] [steps] [out]   e.g. benchmarks/train_testbed.sh cuda 800 results/train
# Frozen-backbone selector runs, full fine-tunes (selectors + backbone) at −50%, and ToMe r=5 fine-tuned the same
# way as the training-free reference at −48%. All runs are independent and go in parallel (one GPU is plenty).
# Selectors now train with top-k decisions (the default for fixed counts); the README's "first version" table used
# Gumbel decisions: add ',decisions=gumbel' to the selector specs to reproduce it.
# VAL='' skips the evaluation at the end of each run (evaluate later with `vitprune bench -m ckpt:<folder>`).
set -euo pipefail
DEVICE=${1:-cpu}; STEPS=${2:-800}; OUT=${3:-results/train}
VP=${VITPRUNE:-vitprune}; VAL=${VAL-testbed}; RATIO=${RATIO:-20}
COMMON=(--device "$DEVICE" --steps "$STEPS" --batch-size 256 --save-every 400 --lambda-ratio "$RATIO" --val-data "$VAL")
declare -A RUNS=(
  [heatvit35]="-m heatvit:keep=(0.65,0.4,0.25)"
  [heatvit50]="-m heatvit:keep=(0.35,0.15,0.1)"
  [spvit35]="-m spvit:keep=(0.7,0.5,0.3)"
  [spvit50]="-m spvit:keep=(0.5,0.25,0.125)"
  [heatvit50_full]="-m heatvit:keep=(0.35,0.15,0.1) --full --backbone-lr 1e-4"
  [spvit50_full]="-m spvit:keep=(0.5,0.25,0.125) --full --backbone-lr 1e-4"
  [tome5_full]="-m tome:r=5 --full --backbone-lr 1e-4"
)
mkdir -p "$OUT"
for name in "${!RUNS[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 $VP train ${RUNS[$name]} "${COMMON[@]}" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
done
wait
