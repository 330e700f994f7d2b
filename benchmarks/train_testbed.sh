#!/usr/bin/env bash
# Learned selectors on the Fashion-MNIST testbed at ≈ −35% and ≈ −50% MACs (issue 4's acceptance runs).
# Usage: benchmarks/train_testbed.sh [device] [steps] [out]   e.g. benchmarks/train_testbed.sh cuda 1000 results/train
# Frozen-backbone runs first (selectors only), then full fine-tunes of the −50% ones started from those selectors,
# and ToMe fine-tuned the same way as the training-free reference. Runs of one phase go in parallel.
set -euo pipefail
DEVICE=${1:-cpu}; STEPS=${2:-1000}; OUT=${3:-results/train}
VP=${VITPRUNE:-vitprune}
COMMON="--device $DEVICE --steps $STEPS --batch-size 256 --save-every 500"
declare -A FROZEN=(
  [heatvit35]="heatvit:keep=(0.65,0.4,0.25)"
  [heatvit50]="heatvit:keep=(0.35,0.15,0.1)"
  [spvit35]="spvit:keep=(0.7,0.5,0.3)"
  [spvit50]="spvit:keep=(0.5,0.25,0.125)"
)
for name in "${!FROZEN[@]}"; do
  $VP train -m "${FROZEN[$name]}" $COMMON --out "$OUT/$name" > "$OUT.$name.log" 2>&1 &
done
wait
for name in heatvit50 spvit50; do
  $VP train -m "${FROZEN[$name]}" $COMMON --full --lr 1e-3 --backbone-lr 1e-4 --init "$OUT/$name" \
    --out "$OUT/${name}_full" > "$OUT.${name}_full.log" 2>&1 &
done
$VP train -m "tome:r=5" $COMMON --full --backbone-lr 1e-4 --out "$OUT/tome5_full" > "$OUT.tome5_full.log" 2>&1 &
wait
for f in "$OUT"/*/summary.json; do echo "$f"; cat "$f"; echo; done
