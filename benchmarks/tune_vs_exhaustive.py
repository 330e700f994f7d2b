"""The tuner's search against exhaustive enumeration on a small space (the tune issue's justification).

    .venv/bin/python benchmarks/tune_vs_exhaustive.py [--images 256] [--macs 0.7] [--levels 5]

Space: ToMe on the shared Fashion-MNIST testbed with one r per third of its 12 blocks, r ∈ 0..levels-1 (125
schedules for 5 levels). Exhaustive: every schedule that meets the MACs budget is scored (fidelity: −KL to the
unpatched model, the tuner's search score). The tuner searches its own, larger space (shapes + greedy descent over
three block groups); printed: the best score each finds, evaluations and wall time, and where the tuner's best
would rank among the exhaustive schedules.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

import vitprune
from vitprune.measure.data import load_dataset, strided_indices
from vitprune.models import create_model
from vitprune.tune import Budget, CostModel, Judge, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--macs", type=float, default=0.7)
    ap.add_argument("--levels", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = create_model("testbed")
    data = load_dataset("testbed")
    idx = strided_indices(len(data), args.images)
    x = torch.stack([data[i][0] for i in idx])
    y = torch.tensor([data[i][1] for i in idx])

    start = time.perf_counter()
    result = tune(model, Budget(macs=args.macs), (x, y), (x, y), (x, y), methods=["tome"], greedy_groups=3)
    tuner_s = time.perf_counter() - start
    search = [c for c in result.candidates if c.split == "search" and c.macs_fraction <= args.macs]
    found = max(search, key=lambda c: c.score)

    start = time.perf_counter()
    judge, cost = Judge(model, x, None), CostModel(model, x)
    scores = []
    for r3 in itertools.product(range(args.levels), repeat=3):
        config = {"r": [r for r in r3 for _ in range(4)]}
        if cost.fraction("tome", config) > args.macs:
            continue
        vitprune.patch(model, "tome", **config)
        scores.append((judge()[0], config["r"]))
        vitprune.unpatch(model)
    exhaustive_s = time.perf_counter() - start
    best_score, best_r = max(scores)
    rank = 1 + sum(s > found.score for s, _ in scores)
    print(f"space: ToMe, one r per third of the blocks, r in 0..{args.levels - 1}: {args.levels ** 3} schedules, "
          f"{len(scores)} within {args.macs} of the MACs; {args.images} testbed images; score = -KL to unpatched")
    print(f"exhaustive: best {best_score:.5f} ({best_r}), {len(scores)} evaluations, {exhaustive_s:.0f} s")
    print(f"tuner:      best {found.score:.5f} ({found.spec}, {found.shape}), {result.evaluations} evaluations "
          f"(search {len(search)} feasible), {tuner_s:.0f} s; would rank {rank} of {len(scores) + 1}")


if __name__ == "__main__":
    main()
