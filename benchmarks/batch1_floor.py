"""Why batch-1 latency does not fall with the token count: a block's fixed cost, and the memory traffic behind it.

    .venv/bin/python benchmarks/batch1_floor.py [--model deit_small_patch16_224] [--threads 2]

Times the model's own blocks (random init, fp32, batch 1, eval) on n tokens for several n, in two ways:

* **cold**: all blocks one after another, as in a forward: a block's weights have left the caches by the time it runs
  again (DeiT-S: 85 MB of block weights against tens of MB of cache);
* **warm**: the first block again and again, its 7 MB of weights staying in the caches.

It fits ``t(n) = fixed + per_token · n`` per block to each, measures the machine's streaming read bandwidth (a sum
over a 256 MB tensor), and prints how much of the cold fixed cost reading the weights at that bandwidth explains.
Then, for each method's token schedule (``--method``, the same defaults as ``batch1_latency.py``), the speedup a free
reduction would get: the full forward's time (patch embedding and head included, timed too) against the same with each
block's measured cold time at its token count (interpolated between the measured counts), divided by the MACs ratio.
That is the ceiling for any implementation at batch 1 on this machine, to compare with ``batch1_latency.py``'s
``bound`` rows (which run it for real).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.utils import benchmark

import vitprune
from vitprune.models import create_model
from vitprune.specs import parse_method_spec

DEFAULT_METHODS = ["tome:r=13", "evit:keep=0.7", "ppt:r=50", "togo:keep=0.69"]
TOKENS = [197, 160, 128, 100, 75, 54, 30]


def seconds(fn, threads: int) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=1.0).median


def fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b·n``."""
    n, t = torch.tensor(ns, dtype=torch.float64), torch.tensor(ts, dtype=torch.float64)
    b = ((n - n.mean()) * (t - t.mean())).sum() / ((n - n.mean()) ** 2).sum()
    return (t.mean() - b * n.mean()).item(), b.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", action="append", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model)
    blocks = list(model.blocks)
    dim = model.embed_dim
    weight_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())

    big = torch.ones(64 * 2**20)  # 256 MB
    bandwidth = big.numel() * 4 / seconds(lambda: big.sum(), args.threads)

    cold, warm = [], []
    with torch.inference_mode():
        for n in TOKENS:
            x = torch.randn(1, n, dim)

            def all_blocks(x: torch.Tensor = x) -> None:
                for blk in blocks:
                    blk(x)

            def first_block(x: torch.Tensor = x) -> None:
                for _ in blocks:
                    blocks[0](x)

            cold.append(seconds(all_blocks, args.threads) / len(blocks))
            warm.append(seconds(first_block, args.threads) / len(blocks))
            print(f"n={n:4d}: cold {cold[-1] * 1e3:6.3f} ms/block, warm {warm[-1] * 1e3:6.3f} ms/block", flush=True)
    (a_cold, b_cold), (a_warm, b_warm) = fit(TOKENS, cold), fit(TOKENS, warm)
    stream = weight_bytes / bandwidth
    print(f"\n{args.model}, batch 1, {args.threads} threads, fp32, torch {torch.__version__}")
    print(f"cold: {a_cold * 1e3:.3f} ms per block + {b_cold * 1e6:.1f} µs per token")
    print(f"warm: {a_warm * 1e3:.3f} ms per block + {b_warm * 1e6:.1f} µs per token")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s: one block's {weight_bytes / 2**20:.1f} MiB of weights take "
          f"{stream * 1e3:.3f} ms to read, {stream / a_cold:.0%} of the cold fixed cost; "
          f"the cold-warm gap is {(a_cold - a_warm) * 1e3:.3f} ms")

    x = torch.randn(1, 3, *model.patch_embed.img_size)
    base_macs = vitprune.count_macs(model, x).macs
    with torch.inference_mode():
        forward = seconds(lambda: model(x), args.threads)
    rest = forward - len(blocks) * cold[0]  # patch embedding, head, Python: does not shrink with the tokens
    print(f"full forward {forward * 1e3:.2f} ms: blocks {len(blocks) * cold[0] * 1e3:.2f} ms, the rest "
          f"{rest * 1e3:.2f} ms")

    def block_time(n: float) -> float:  # measured cold time, linear between the measured counts
        ns, ts = TOKENS[::-1], cold[::-1]
        i = max(1, min(len(ns) - 1, next((j for j, m in enumerate(ns) if m >= n), len(ns) - 1)))
        return ts[i - 1] + (ts[i] - ts[i - 1]) * (n - ns[i - 1]) / (ns[i] - ns[i - 1])
    print(f"\n{'method':<16} {'MACs×':>6} {'free-reduction ceiling':>23} {'/MACs':>6}")
    for spec in args.method or DEFAULT_METHODS:
        name, config = parse_method_spec(spec)
        patched = vitprune.patch(copy.deepcopy(model), name, **config)
        with torch.inference_mode():
            patched(x)
        trace = vitprune.last_trace(patched)
        # a block reduces after its attention: a third of its weights (qkv, proj) see the attention's count
        counts = [(a + 2 * m) / 3 for a, m in zip(trace.tokens_attn, trace.tokens_mlp)]
        ratio = base_macs / vitprune.count_macs(patched, x).macs
        ceiling = forward / (rest + sum(block_time(n) for n in counts))
        print(f"{spec:<16} {ratio:6.2f} {ceiling:22.2f}× {ceiling / ratio:6.2f}")


if __name__ == "__main__":
    main()
