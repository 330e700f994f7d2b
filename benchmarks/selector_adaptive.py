"""Adaptive (per-image threshold) selectors: a padded batch vs running the images one by one.

    .venv/bin/python benchmarks/selector_adaptive.py [--checkpoint results/train/<run>] [--batch-size 32]
        [--threads 2] [--rounds 7] [--threshold 0.5]

With ``mode="adaptive"`` each image keeps its own number of tokens. Two ways to run a batch:

* **padded** (the default): one forward over the batch, gathered to the largest count in the batch; each image's
  padding is masked out of attention (a −inf key mask in the same SDPA call);
* **per image**: one forward per image (batch 1), no padding, no mask.

Both compute the same outputs (``tests/test_selectors.py`` checks it). This times them round-robin on real testbed
images (``measure.speed.round_robin``) with the selectors of ``--checkpoint`` (a trained HeatViT/SPViT folder), or
untrained HeatViT selectors when none is given, and reports images/s, the tokens each image kept and the padding.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import vitprune
from vitprune.measure.speed import round_robin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a trained selector folder (vitprune train --out)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()

    from vitprune.measure.data import load_dataset
    from vitprune.assets import testbed_paths
    from vitprune.models import create_model

    if args.checkpoint:
        model = vitprune.load("testbed", args.checkpoint)
        method = model._vitprune.method
        method.mode, method.threshold = "adaptive", args.threshold
        label = f"{args.checkpoint}"
    else:
        torch.manual_seed(0)
        model = vitprune.patch(create_model("testbed"), "heatvit", mode="adaptive", threshold=args.threshold)
        label = "untrained heatvit selectors"
    model.eval()
    data = load_dataset(str(testbed_paths().test), limit=args.batch_size)
    batch = torch.stack([data[i][0] for i in range(args.batch_size)])

    with torch.inference_mode():
        padded = model(batch)
        kept = vitprune.last_trace(model).notes["selector_kept"]
        one_by_one = torch.cat([model(batch[i:i + 1]) for i in range(len(batch))])
        diff = float((padded - one_by_one).abs().max())

        def per_image() -> object:
            return [model(batch[i:i + 1]) for i in range(len(batch))]

        times = round_robin([(lambda: None, lambda: model(batch)), (lambda: None, per_image)],
                            threads=args.threads, rounds=args.rounds).times
    pad_s, one_s = (statistics.median(t) for t in times)
    print(f"{label}: batch {args.batch_size}, {args.threads} threads, fp32, cpu, {args.rounds} rounds, "
          f"threshold {args.threshold}")
    for layer, counts in kept.items():
        c = counts.float()
        print(f"  selector before block {layer}: kept per image mean {c.mean():.1f}, min {int(c.min())}, "
              f"max {int(c.max())} (the padded batch runs {int(c.max())}: {1 - c.mean() / c.max():.0%} padding)")
    print(f"max |padded − per image| = {diff:.2e}")
    print(f"{'execution':<10} {'img/s':>8}")
    print(f"{'padded':<10} {args.batch_size / pad_s:8.1f}")
    print(f"{'per image':<10} {args.batch_size / one_s:8.1f}")
    faster = "padded" if pad_s <= one_s else "per image"
    print(f"faster: {faster} ({max(pad_s, one_s) / min(pad_s, one_s):.2f}x)")


if __name__ == "__main__":
    main()
