"""Speed of SPViT-style selectors on Swin vs the unpatched model, at SPViT's reported Swin budgets
(Swin-T 4.50 → 3.47 GMACs, Swin-S 8.70 → 6.35 GMACs).

    .venv/bin/python benchmarks/speed_swin.py [--model swin_tiny_patch4_window7_224] [--batch-size 32]
        [--threads 2] [--rounds 7]
    .venv/bin/python benchmarks/speed_swin.py --find [--model swin_small_patch4_window7_224]

Random-init models (fixed-count inference: the cost does not depend on the selectors' weights). The timed
configuration is ``vitprune.patch(model, "spvit")`` with no keep/blocks: the Swin defaults, which ``--find``
re-derives — selectors at three blocks of the long third stage and at the last block, keep = (ρ, ρ², ρ³, ρ) of each
stage's patch tokens, the largest ρ whose MACs, counted from the executed ops, fit the budget (bisection).
All configurations are timed round-robin (``interleaved_throughput``), so drift of a shared machine hits them
alike: the unpatched model as timm builds it (explicit softmax: timm marks its SDPA path for Swin experimental), the
unpatched model on timm's SDPA path (``fused_attn=True``, faster), spvit, and with ``--engine`` the engine alone
(one selector that keeps every token, at the last block). Goal: speedup over the *faster* unpatched forward
≥ 0.85 × MACs ratio.
"""
from __future__ import annotations

import argparse

import timm
import torch

import vitprune
from vitprune.measure.flops import count_macs
from vitprune.measure.speed import interleaved_throughput
from vitprune.tune import bisect_level

# model → (selector blocks, SPViT's budget in GMACs)
SETTINGS = {
    "swin_tiny_patch4_window7_224": ((5, 7, 9, 11), 3.47),
    "swin_small_patch4_window7_224": ((8, 13, 17, 23), 6.35),
}


def keeps(rho: float) -> tuple[float, ...]:
    return (rho, rho ** 2, rho ** 3, rho)


def find_rho(model: torch.nn.Module, x: torch.Tensor, blocks: tuple[int, ...], budget: float) -> float | None:
    """The largest ρ (3 decimals) whose counted GMACs fit ``budget``; None if even ρ → 0 does not."""
    base = count_macs(model, x).gmacs

    def cost(level: float) -> float:  # bisect_level wants a cost that falls with the level: level = 1 − ρ
        vitprune.patch(model, "spvit", keep=keeps(max(1.0 - level, 1e-3)), blocks=blocks)
        return count_macs(model, x).gmacs / base

    level = bisect_level(cost, budget / base)
    vitprune.unpatch(model)
    return None if level is None else int((1.0 - level) * 1000) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swin_tiny_patch4_window7_224", choices=sorted(SETTINGS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--find", action="store_true", help="re-derive the default keep rates by bisection and stop")
    ap.add_argument("--engine", action="store_true",
                    help="also time the engine alone (one selector keeping every token, at the last block)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    timm_fused = model.layers[0].blocks[0].attn.fused_attn  # timm's default (its SDPA path is experimental for Swin)
    one = torch.randn(1, 3, 224, 224)
    blocks, budget = SETTINGS[args.model]
    if args.find:
        rho = find_rho(model, one, blocks, budget)
        if rho is None:
            raise SystemExit(f"{args.model}: no ρ fits {budget} GMACs with selectors at {blocks}")
        vitprune.patch(model, "spvit", keep=keeps(rho), blocks=blocks)
        print(f"{args.model}: rho={rho} keep={tuple(round(k, 3) for k in keeps(rho))} blocks={blocks} "
              f"→ {count_macs(model, one).gmacs:.3f} GMACs (budget {budget})")
        return

    base = count_macs(model, one).gmacs
    method = vitprune.create_method("spvit")  # the Swin defaults; one object: same selectors each round
    vitprune.patch(model, method)
    pruned = count_macs(model, one).gmacs
    tokens = vitprune.last_trace(model).tokens_attn
    vitprune.unpatch(model)
    depth = sum(len(stage.blocks) for stage in model.layers)
    engine = vitprune.create_method("spvit", keep=1.0, blocks=(depth - 1,), package="none")

    def unpatched(fused: bool):
        def setup() -> None:
            if vitprune.is_patched(model):
                vitprune.unpatch(model)
            for module in model.modules():
                if hasattr(module, "relative_position_bias_table"):
                    module.fused_attn = fused
        return setup

    configs = {"unpatched": unpatched(timm_fused), "timm fused": unpatched(True),
               "spvit": lambda: vitprune.patch(model, method)}
    if args.engine:
        configs["engine"] = lambda: vitprune.patch(model, engine)
    batch = torch.randn(args.batch_size, 3, 224, 224)
    results = interleaved_throughput(model, batch, list(configs.values()), threads=args.threads, rounds=args.rounds)
    speed = {name: r.img_per_s for name, r in zip(configs, results)}
    macs = {"unpatched": base, "timm fused": base, "spvit": pruned, "engine": base}
    print(f"{args.model}: batch {args.batch_size}, {args.threads} threads, fp32, cpu, {args.rounds} rounds")
    print(f"spvit {method.describe()}; tokens per block {tokens}")
    print(f"{'config':<11} {'GMACs':>6} {'img/s':>7} {'speedup':>8}")
    for name, img_s in speed.items():
        print(f"{name:<11} {macs[name]:6.3f} {img_s:7.1f} {img_s / speed['unpatched']:7.2f}x")
    ratio, fastest = base / pruned, max(speed["unpatched"], speed["timm fused"])
    speedup = speed["spvit"] / fastest
    print(f"MACs ratio {ratio:.3f}x; speedup over the faster unpatched forward {speedup:.2f}x; "
          f"speedup / MACs ratio = {speedup / ratio:.2f} (goal ≥ 0.85: {'met' if speedup >= 0.85 * ratio else 'MISSED'})")


if __name__ == "__main__":
    main()
