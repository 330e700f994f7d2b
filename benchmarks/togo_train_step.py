"""ViT-ToGo cost in training and inference: a pruned training step vs an unpruned one, and grouped vs top-k selection.

    .venv/bin/python benchmarks/togo_train_step.py [--model deit_tiny_patch16_224|testbed] [--keep 0.69]
        [--batch-size 32] [--threads 2] [--rounds 5] [--skip-train] [--skip-infer]

1. Training step (forward + backward + AdamW step, batch 32, fp32, CPU) of the unpatched model vs ToGo with
   training-free head weights (backbone trained) and with the learned head-importance estimator (backbone +
   estimator trained).
2. Inference (batch 32) of the unpatched model, ToGo (grouped selection: dropped, packaged, learned) and per-token
   top-k with the same importance and the same token counts (``ToGoPerTokenTopK``): speedup vs MACs ratio
   (goal: ≥ 0.93×) and what grouped selection costs compared with a per-token sort.
3. The selection alone (importance → kept tokens) at the first pruning block, grouped vs per-token top-k.

Every part is timed round-robin with torch.utils.benchmark (each round times every configuration once), so drift
of a shared machine hits all configurations alike. Both the median and the best (min) round are printed; on a
busy machine the min is the better estimate of the uncontended cost. Random-init weights (timing does not depend
on them); ``--model testbed`` uses the shared Fashion-MNIST model.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

import vitprune
from vitprune.measure.flops import count_macs
from vitprune.measure.speed import round_robin as timing_round_robin
from vitprune.methods.togo import ToGo, ToGoPerTokenTopK
from vitprune.models import create_model
from vitprune.tokens import TokenState


def round_robin(configs: dict[str, tuple[Callable[[], None], Callable[[], object]]], threads: int, rounds: int,
                min_round_time: float, warmup: int = 2) -> dict[str, list[float]]:
    """``configs[label] = (setup, fn)``: seconds per ``fn()`` call per round (vitprune's round-robin timer)."""
    times = timing_round_robin(list(configs.values()), threads=threads, rounds=rounds,
                               min_round_time=min_round_time, warmup=warmup).times
    return dict(zip(configs, times))


def stats(t: list[float]) -> tuple[float, float, float]:
    med = statistics.median(t)
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
    return med, min(t), q[2] - q[0]


def use(model, method):
    def setup():
        if method is not None:
            vitprune.patch(model, method)  # the same object each time: a learned estimator is reused
        elif vitprune.is_patched(model):
            vitprune.unpatch(model)
    return setup


def macs_of(model, method, x) -> float:
    use(model, method)()
    return count_macs(model, x[:1]).macs


def train_step_bench(model, x, y, keep, group, threads, rounds) -> None:
    methods = {
        "unpruned": None,
        "togo attention": ToGo(keep=keep, group=group),
        "togo learned (+estimator)": ToGo(keep=keep, group=group, head_weights="learned"),
    }
    configs, n_params, macs = {}, {}, {}
    for label, method in methods.items():
        macs[label] = macs_of(model, method, x)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # patched: includes a learned estimator
        n_params[label] = sum(p.numel() for p in model.parameters())

        def step(opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def setup(method=method):
            use(model, method)()
            model.train()

        configs[label] = (setup, step)
    times = round_robin(configs, threads, rounds, min_round_time=0.0, warmup=2)
    model.eval()
    print(f"\n== training step: forward+backward+AdamW, batch {x.shape[0]}, {threads} threads, fp32, {rounds} rounds ==")
    print(f"{'config':<28}{'median ms':>10}{'iqr':>8}{'min ms':>9}{'speedup med/min':>17}{'fwd MACs ratio':>16}"
          f"{'params':>11}")
    b_med, b_min, _ = stats(times["unpruned"])
    for label in methods:
        med, mn, iqr = stats(times[label])
        print(f"{label:<28}{med * 1e3:>10.0f}{iqr * 1e3:>8.0f}{mn * 1e3:>9.0f}{b_med / med:>11.2f}x/{b_min / mn:.2f}x"
              f"{macs['unpruned'] / macs[label]:>15.2f}x{n_params[label]:>11,}")
    use(model, None)()


def inference_bench(model, x, keep, group, threads, rounds) -> None:
    methods = {
        "unpruned": None,
        f"togo g={group} dropped": ToGo(keep=keep, group=group),
        f"togo g={group} package": ToGo(keep=keep, group=group, package=True),
        f"togo g={group} learned": ToGo(keep=keep, group=group, head_weights="learned"),
        "per-token top-k (same K)": ToGoPerTokenTopK(keep=keep, group=group),
    }
    model.eval()
    macs = {label: macs_of(model, m, x) for label, m in methods.items()}

    def forward():
        with torch.inference_mode():
            return model(x)

    times = round_robin({label: (use(model, m), forward) for label, m in methods.items()}, threads, rounds,
                        min_round_time=0.5)
    print(f"\n== inference: batch {x.shape[0]}, {threads} threads, fp32, {rounds} rounds, keep={keep} ==")
    print(f"{'config':<28}{'GMACs':>7}{'median ms':>11}{'iqr':>8}{'min ms':>9}{'speedup med/min':>17}"
          f"{'MACs ratio':>12}{'spd/MACs med/min':>18}")
    b_med, b_min, _ = stats(times["unpruned"])
    for label in methods:
        med, mn, iqr = stats(times[label])
        ratio = macs["unpruned"] / macs[label]
        print(f"{label:<28}{macs[label] / 1e9:>7.3f}{med * 1e3:>11.1f}{iqr * 1e3:>8.1f}{mn * 1e3:>9.1f}"
              f"{b_med / med:>11.2f}x/{b_min / mn:.2f}x{ratio:>11.2f}x{b_med / med / ratio:>13.2f}/{b_min / mn / ratio:.2f}")
    g_med, g_min, _ = stats(times[f"togo g={group} dropped"])
    t_med, t_min, _ = stats(times["per-token top-k (same K)"])
    print(f"grouped vs per-token top-k, same token counts: median {(g_med / t_med - 1) * 100:+.1f}%, "
          f"min {(g_min / t_min - 1) * 100:+.1f}%")
    use(model, None)()


def selection_bench(model, batch, keep, group, threads, rounds) -> None:
    """The selection step alone at the first pruning block (block 3): importance → kept tokens."""
    vitprune.patch(model, "togo", keep=keep, group=group)
    info = model._vitprune.info
    vitprune.unpatch(model)
    n = info.num_tokens
    state = TokenState.initial(torch.randn(batch, n, info.dim), info.num_prefix, grid=info.grid)
    importance = torch.rand(batch, n)
    configs, kept = {}, {}
    for label, method in [(f"grouped g={group}", ToGo(keep=keep, group=group)),
                          ("grouped g=1", ToGo(keep=keep, group=1)),
                          ("per-token top-k (same K)", ToGoPerTokenTopK(keep=keep, group=group)),
                          (f"grouped g={group} + package", ToGo(keep=keep, group=group, package=True))]:
        method.setup(info)
        stage = method.plan(info.grid)[3]
        kept[label] = stage.tokens_kept
        configs[label] = (lambda: None, lambda m=method, st=stage: m._prune(state, importance, st))
    times = round_robin(configs, threads, rounds, min_round_time=0.2)
    print(f"\n== selection alone: [{batch}, {n}, {info.dim}] tokens, keep={keep}, block 3, {rounds} rounds ==")
    for label in configs:
        med, mn, _ = stats(times[label])
        print(f"{label:<30}median {med * 1e6:>7.0f} µs  min {mn * 1e6:>7.0f} µs  "
              f"(keeps {kept[label]} of {n - info.num_prefix} patch tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--keep", type=float, default=0.69)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model)  # "testbed": shared weights; a timm name: random init
    x = torch.randn(args.batch_size, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    print(f"{args.model}: keep={args.keep} at blocks (3, 6, 9), group={args.group}")
    if not args.skip_train:
        train_step_bench(model, x, y, args.keep, args.group, args.threads, args.rounds)
    if not args.skip_infer:
        inference_bench(model, x, args.keep, args.group, args.threads, args.rounds)
    selection_bench(model, args.batch_size, args.keep, args.group, args.threads, args.rounds)


if __name__ == "__main__":
    main()
