#!/usr/bin/env bash
# Quantization-aware training vs post-training quantization on the Fashion-MNIST testbed (issue 5).
# Usage: benchmarks/qat_testbed.sh [steps] [out]      e.g. benchmarks/qat_testbed.sh 100 results/qat
# The same full fine-tune under ToMe r=4 runs twice: in fp32, and under HeatViT's int8 + polynomial GELU/softmax
# (fake quant, straight-through rounding). Both sets of weights then go through `vitprune quantize` (calibrate on
# 128 training-free images, evaluate fp32 / int8 / int8+poly, unpatched and under ToMe r=4): the fp32 run's
# int8 rows are post-training quantization (PTQ), the QAT run's are quantization-aware training. Fine-tuning both
# the same way separates what QAT buys from what any extra training buys this testbed backbone.
set -euo pipefail
STEPS=${1:-100}; OUT=${2:-results/qat}
VP=${VITPRUNE:-vitprune}; LIMIT=${LIMIT:-2000}
COMMON=(-m tome:r=4 --full --backbone-lr 1e-4 --steps "$STEPS" --batch-size 128 --save-every "$STEPS" --val-data '')
$VP train "${COMMON[@]}" --out "$OUT/fp32"
$VP train "${COMMON[@]}" --quantize int8+poly --out "$OUT/qat"
for run in fp32 qat; do
  $VP quantize --checkpoint "$OUT/$run/backbone.safetensors" -m tome:r=4 --limit "$LIMIT" --out "$OUT/$run"
done
