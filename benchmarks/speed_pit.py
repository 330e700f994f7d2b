"""Speed of SPViT-style selectors on PiT-S vs the unpatched model, at SPViT's reported reduction (2.90 → 2.22 GMACs).

    .venv/bin/python benchmarks/speed_pit.py [--batch-size 32] [--threads 2] [--rounds 7]
        [--target-gmacs 2.22] [--rho R]

Random-init pit_s_224 (fixed-count inference: the cost does not depend on the selectors' weights). Selectors before
blocks 1 (stage 0), 3 and 6 (stage 1) and 9 (stage 2), keep = (ρ, ρ, ρ², ρ) of each stage's patch tokens; ρ is found
by bisection on MACs counted from the executed ops. Both configurations are timed round-robin
(``interleaved_throughput``), so drift of a shared machine hits both alike. Goal: speedup ≥ 0.85 × MACs ratio.
"""
from __future__ import annotations

import argparse

import timm
import torch

import vitprune
from vitprune.measure.flops import count_macs
from vitprune.measure.speed import interleaved_throughput

BLOCKS = (1, 3, 6, 9)


def keeps(rho: float) -> tuple[float, ...]:
    return (rho, rho, rho * rho, rho)


def find_rho(model: torch.nn.Module, x: torch.Tensor, target: float) -> float:
    lo, hi = 0.05, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        vitprune.patch(model, "spvit", keep=keeps(mid), blocks=BLOCKS)
        if count_macs(model, x).gmacs > target:
            hi = mid
        else:
            lo = mid
    vitprune.unpatch(model)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pit_s_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-gmacs", type=float, default=2.22)
    ap.add_argument("--rho", type=float, default=None, help="skip the search and use this keep rate")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    one = torch.randn(1, 3, 224, 224)
    base = count_macs(model, one).gmacs
    rho = args.rho if args.rho is not None else find_rho(model, one, args.target_gmacs)
    method = vitprune.create_method("spvit", keep=keeps(rho), blocks=BLOCKS)  # one object: same selectors each round
    vitprune.patch(model, method)
    pruned = count_macs(model, one).gmacs
    tokens = vitprune.last_trace(model).tokens_attn
    vitprune.unpatch(model)

    def unpatched() -> None:
        if vitprune.is_patched(model):
            vitprune.unpatch(model)

    def spvit() -> None:
        vitprune.patch(model, method)

    batch = torch.randn(args.batch_size, 3, 224, 224)
    ref, red = interleaved_throughput(model, batch, [unpatched, spvit], threads=args.threads, rounds=args.rounds)
    speedup, ratio = red.img_per_s / ref.img_per_s, base / pruned
    print(f"{args.model}: batch {args.batch_size}, {args.threads} threads, fp32, cpu, {args.rounds} rounds")
    print(f"spvit keep={'/'.join(f'{k:.3f}' for k in keeps(rho))} @ blocks {BLOCKS}; tokens per block {tokens}")
    print(f"{'config':<10} {'GMACs':>6} {'img/s':>7} {'speedup':>8}")
    print(f"{'unpatched':<10} {base:6.3f} {ref.img_per_s:7.1f} {1.0:7.2f}x")
    print(f"{'spvit':<10} {pruned:6.3f} {red.img_per_s:7.1f} {speedup:7.2f}x")
    print(f"MACs ratio {ratio:.3f}x; speedup / MACs ratio = {speedup / ratio:.2f} (goal ≥ 0.85: "
          f"{'met' if speedup >= 0.85 * ratio else 'MISSED'})")


if __name__ == "__main__":
    main()
