"""Why batch-1 latency does not fall with the token count: a block's fixed cost, and the memory traffic behind it.

    .venv/bin/python benchmarks/batch1_floor.py [--model deit_small_patch16_224] [--threads 2] [--rounds 5]

Times the parts of a timm ViT (random init, fp32, batch 1, eval) on n tokens for several n, all interleaved
(``vitprune.measure.speed.round_robin``, medians over rounds, so a shared machine's drift hits every part alike):

* **cold** blocks: all blocks one after another, as in a forward: a block's weights have left the caches by the time
  it runs again (DeiT-S: 85 MB of block weights against tens of MB of cache);
* **warm** blocks: the first block again and again, its 7 MB of weights staying in the caches;
* the **stem and head** (patch embedding, position embedding, final norm, classifier), which do not shrink with the
  tokens; and the full forward, as a check that the parts add up.

It fits ``t(n) = fixed + per_token · n`` per block to each, measures the machine's streaming read bandwidth (a sum over
a 256 MB tensor), and prints how much of the cold fixed cost reading the weights at that bandwidth would explain.
Then, for each method's token schedule (``--method``, the same defaults as ``batch1_latency.py``), the speedup a free
reduction would get: stem and head + each block's cold time at its token count (linear between the measured counts)
against the same at full count, divided by the MACs ratio. That is the ceiling for any implementation at batch 1 on
this machine, to compare with ``batch1_latency.py``'s ``bound`` rows (which run it for real).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
from torch.utils import benchmark

import vitprune
from vitprune.measure.speed import round_robin
from vitprune.models import create_model
from vitprune.specs import parse_method_spec

from batch1_latency import DEFAULT_METHODS

TOKENS = [197, 160, 128, 100, 75, 54, 30]


def fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b·n``."""
    n, t = torch.tensor(ns, dtype=torch.float64), torch.tensor(ts, dtype=torch.float64)
    b = ((n - n.mean()) * (t - t.mean())).sum() / ((n - n.mean()) ** 2).sum()
    return (t.mean() - b * n.mean()).item(), b.item()


def interpolate(ns: list[int], ts: list[float], n: float) -> float:
    """``t(n)`` linear between the measured counts (any order), extrapolated from the nearest two outside them."""
    pairs = sorted(zip(ns, ts))
    i = max(1, min(len(pairs) - 1, next((j for j, (m, _) in enumerate(pairs) if m >= n), len(pairs) - 1)))
    (n0, t0), (n1, t1) = pairs[i - 1], pairs[i]
    return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--method", action="append", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model)
    blocks = list(model.blocks)
    weight_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    image = torch.randn(1, 3, *model.patch_embed.img_size)

    def stem() -> torch.Tensor:
        return model.norm_pre(model._pos_embed(model.patch_embed(image)))

    with torch.inference_mode():
        tokens = stem()

    def stem_and_head() -> None:
        stem()
        model.forward_head(model.norm(tokens))

    def cold(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for blk in blocks:
                blk(x)
        return run

    def warm(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for _ in blocks:
                blocks[0](x)
        return run

    inputs = [tokens[:, :n].clone() for n in TOKENS]
    fns = [cold(x) for x in inputs] + [warm(x) for x in inputs] + [stem_and_head, lambda: model(image)]
    with torch.inference_mode():
        times = round_robin([(lambda: None, f) for f in fns], threads=args.threads, rounds=args.rounds,
                            min_round_time=0.5, on_round=lambda m: print(m, flush=True)).times
    medians = [statistics.median(t) for t in times]
    k = len(TOKENS)
    cold_t = [t / len(blocks) for t in medians[:k]]
    warm_t = [t / len(blocks) for t in medians[k:2 * k]]
    rest, forward = medians[2 * k], medians[2 * k + 1]
    big = torch.ones(64 * 2**20)  # 256 MB
    bandwidth = big.numel() * 4 / benchmark.Timer("big.sum()", globals={"big": big}, num_threads=args.threads
                                                  ).blocked_autorange(min_run_time=1.0).median

    print(f"\n{args.model}, batch 1, {args.threads} threads, fp32, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds")
    for n, c, w in zip(TOKENS, cold_t, warm_t):
        print(f"n={n:4d}: cold {c * 1e3:6.3f} ms/block, warm {w * 1e3:6.3f} ms/block")
    (a_cold, b_cold), (a_warm, b_warm) = fit(TOKENS, cold_t), fit(TOKENS, warm_t)
    stream = weight_bytes / bandwidth
    print(f"cold: {a_cold * 1e3:.3f} ms per block + {b_cold * 1e6:.1f} µs per token")
    print(f"warm: {a_warm * 1e3:.3f} ms per block + {b_warm * 1e6:.1f} µs per token")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s: one block's {weight_bytes / 2**20:.1f} MiB of weights take "
          f"{stream * 1e3:.3f} ms to read, {stream / a_cold:.0%} of the cold fixed cost; "
          f"the cold-warm gap is {(a_cold - a_warm) * 1e3:.3f} ms")
    full = rest + len(blocks) * cold_t[0]
    print(f"stem and head {rest * 1e3:.2f} ms; stem + head + {len(blocks)} cold blocks at {TOKENS[0]} tokens "
          f"{full * 1e3:.2f} ms against a full forward of {forward * 1e3:.2f} ms")

    base_macs = vitprune.count_macs(model, image).macs
    print(f"\n{'method':<16} {'MACs×':>6} {'free-reduction ceiling':>23} {'/MACs':>6}")
    for spec in args.method or DEFAULT_METHODS:
        name, config = parse_method_spec(spec)
        patched = vitprune.patch(copy.deepcopy(model), name, **config)
        with torch.inference_mode():
            patched(image)
        trace = vitprune.last_trace(patched)
        # a block reduces after its attention: a third of its weights (qkv, proj) see the attention's count
        counts = [(a + 2 * m) / 3 for a, m in zip(trace.tokens_attn, trace.tokens_mlp)]
        ratio = base_macs / vitprune.count_macs(patched, image).macs
        ceiling = full / (rest + sum(interpolate(TOKENS, cold_t, n) for n in counts))
        print(f"{spec:<16} {ratio:6.2f} {ceiling:22.2f}× {ceiling / ratio:6.2f}")


if __name__ == "__main__":
    main()
