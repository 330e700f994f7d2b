"""Speed of ToMe r=13 and EViT keep=0.7 vs the unpatched DeiT-S, in one run (the foundation issue's benchmark).

    .venv/bin/python benchmarks/speed_deit_small.py [--batch-size 32] [--threads 2] [--rounds 7]

Random-init deit_small_patch16_224 (speed does not depend on the weights for these fixed-count methods).
Reference point on this kind of 2-core machine: the official ToMe code (explicit softmax attention) reaches 1.77×
at r=13. Checks printed at the end: each method's speedup ≥ 0.95 × its MACs ratio; ToMe r=13 ≥ 1.77×.
"""
from __future__ import annotations

import argparse

import torch

from vitprune.bench import BenchSettings, run_bench
from vitprune.measure.report import print_table
from vitprune.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--method", action="append", default=None)
    args = ap.parse_args()

    model = create_model(args.model)
    specs = args.method or ["tome:r=13", "evit:keep=0.7"]
    example = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    settings = BenchSettings(batch_size=args.batch_size, threads=args.threads, rounds=args.rounds)
    result = run_bench(model, args.model, specs, None, settings, example, on_step=lambda m: print(m, flush=True))
    print_table(result.rows, title=f"{args.model}: batch {args.batch_size}, {args.threads} threads, fp32, cpu")
    ok = True
    for row in result.rows[1:]:
        floor = 0.95 * row.macs_ratio
        if row.extra["spec"] == "tome:r=13":
            floor = max(floor, 1.77)
        passed = row.speedup >= floor
        ok &= passed
        print(f"{row.extra['spec']:>16}: speedup {row.speedup:.2f}x, MACs ratio {row.macs_ratio:.2f}x, "
              f"floor {floor:.2f}x -> {'ok' if passed else 'BELOW FLOOR'}")
    print("all floors met" if ok else "some floors missed")


if __name__ == "__main__":
    main()
