"""DeiT-S in PyTorch vs ONNX Runtime fp32 and dynamic int8, unpatched and token-reduced, timed round-robin in one run.

    .venv/bin/python benchmarks/onnx_deit_small.py [--method tome:r=13] [--batch-size 32] [--threads 2] [--rounds 5]

Random-init deit_small_patch16_224 (speed does not depend on the weights for fixed-count methods). Every
configuration runs in PyTorch fp32 and, exported to ONNX, in ONNX Runtime fp32 and int8 (`vitprune bench --runtime
onnxruntime` underneath); speedups are against unpatched PyTorch fp32 in the same run. Target checked at the end:
a ≈ −35% MACs method in ORT int8 reaches ≥ 3× the throughput of unpatched PyTorch fp32.
"""
from __future__ import annotations

import argparse
import time

import torch

from vitprune.bench import BenchSettings, run_bench
from vitprune.measure.report import print_table
from vitprune.models import create_model

TARGET = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--method", action="append", default=None, help="method spec, repeatable (default: tome:r=13, "
                    "evit:keep=0.7)")
    args = ap.parse_args()

    start = time.time()
    model = create_model(args.model)
    specs = args.method or ["tome:r=13", "evit:keep=0.7"]
    example = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    settings = BenchSettings(batch_size=args.batch_size, threads=args.threads, rounds=args.rounds,
                             runtime="onnxruntime")
    result = run_bench(model, args.model, specs, None, settings, example, on_step=lambda m: print(m, flush=True))
    print_table(result.rows, title=f"{args.model}: batch {args.batch_size}, {args.threads} threads, CPU, "
                f"{args.rounds} interleaved rounds")
    base = result.rows[0]
    print(f"unpatched PyTorch fp32: {base.img_per_s:.1f} img/s")
    for row in result.rows[1:]:
        print(f"{row.extra['spec']:>16} {row.extra['runtime']:>17}: {row.img_per_s:6.1f} img/s  speedup "
              f"{row.speedup:.2f}x  (MACs -{100 * (1 - 1 / row.macs_ratio):.0f}%)")
    for row in result.rows:
        if row.method != "none" and row.extra["runtime"] == "onnxruntime int8":
            verdict = "ok" if row.speedup >= TARGET else "BELOW TARGET"
            print(f"target: {row.extra['spec']} ORT int8 >= {TARGET:.0f}x unpatched PyTorch fp32: "
                  f"{row.speedup:.2f}x -> {verdict}")
    if result.meta.get("noisy_timings"):
        print("noisy timings (round-to-round spread > 15% of the median): " + ", ".join(result.meta["noisy_timings"]))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
