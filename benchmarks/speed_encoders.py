"""Speed of ToMe at about −35% MACs on today's encoders vs the unpatched model, in one run (the encoders issue).

    .venv/bin/python benchmarks/speed_encoders.py [--batch-size 32] [--threads 2] [--rounds 5]

Random-init ``vit_base_patch16_siglip_224`` (MAP head, no CLS) and ``eva02_small_patch14_224`` (RoPE, SwiGLU):
speed does not depend on the weights for fixed-count methods. ToMe's r per model is the one that removes about 35%
of the MACs (counted from executed ops): SigLIP-B/16 r=11 (−35.3%), EVA02-S/14 r=14 (−34.5%). EViT keep=0.7 runs
alongside (received attention on SigLIP). Printed at the end: ToMe's speedup ≥ 0.95 × its MACs ratio per model.
"""
from __future__ import annotations

import argparse

import torch

from vitprune.bench import BenchSettings, run_bench
from vitprune.measure.report import print_table
from vitprune.models import create_model

TOME_AT_35 = {"vit_base_patch16_siglip_224": 11, "eva02_small_patch14_224": 14}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="repeatable; default: both encoders")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    ok = True
    for name in args.model or list(TOME_AT_35):
        model = create_model(name)
        tome = f"tome:r={TOME_AT_35.get(name, 13)}"
        example = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
        settings = BenchSettings(batch_size=args.batch_size, threads=args.threads, rounds=args.rounds)
        result = run_bench(model, name, [tome, "evit:keep=0.7"], None, settings, example,
                           on_step=lambda m: print(m, flush=True))
        print_table(result.rows, title=f"{name}: batch {args.batch_size}, {args.threads} threads, fp32, cpu")
        for row in result.rows[1:]:
            floor = 0.95 * row.macs_ratio
            passed = row.speedup >= floor
            if row.extra["spec"] == tome:
                ok &= passed
            print(f"{name} {row.extra['spec']:>14}: speedup {row.speedup:.2f}x, MACs ratio {row.macs_ratio:.2f}x, "
                  f"0.95 x ratio {floor:.2f}x -> {'ok' if passed else 'below'}")
    print("ToMe floors met" if ok else "some ToMe floors missed")


if __name__ == "__main__":
    main()
