"""Batch-1 latency of the fixed-count methods against their MACs ratio, eager and under torch.compile, in one run.

    .venv/bin/python benchmarks/batch1_latency.py [--threads 2] [--rounds 7] [--no-compile] [--method tome:r=13 ...]
        [--peer tome=PATH/TO/ToMe --peer ppt=PATH/TO/PPT]

Random-init deit_small_patch16_224 (latency does not depend on the weights for fixed-count methods), batch 1, fp32,
CPU. For every method it prints the MACs ratio (counted from the executed ops), the p50 latency speedup of the eager
patched model over the eager unpatched one, the same for ``torch.compile(model, fullgraph=True)`` of
both, compiled with Inductor's ``freezing`` on (compile warm-up excluded from timing; freezing lets Inductor pre-pack
the weights for MKL, the fastest compiled path on CPU; ``--no-freezing`` for plain ``torch.compile``), each speedup
divided by the MACs ratio, and the check "best speedup ≥ 0.95 × MACs ratio".

Freezing must be on while the model compiles, i.e. during the first call, and for Dynamo as well as Inductor:
``torch.compile(..., options={"freezing": True})`` reaches only Inductor and silently compiles without it, so the
script wraps the first calls in ``torch._inductor.config.patch(freezing=True)`` (or set ``TORCHINDUCTOR_FREEZING=1``).

Two control rows tell where a gap comes from:

* ``tome:r=0`` is the engine alone (no reduction): how much of a speedup is the engine's own path, not the method;
* ``bound`` (one per method): the unpatched blocks run on the method's token counts with reduction made free (the
  tokens are sliced, no scores, no sort, no gather, no size bias). No implementation of the method can beat it, so
  ``bound / MACs ratio`` is what the cost of the blocks themselves allows at this batch size on this machine.

``--peer``: the official ToMe and PPT code (clones of their repos, see ``official_peers.py``) as rows of the same
run, eager and ``torch.compile`` (without ``fullgraph``: their Python-list bookkeeping breaks the graph; a peer that
does not compile says why and is timed eager only).

All configurations (eager and compiled) are timed round-robin with ``vitprune.measure.speed.round_robin``, so drift of
a shared machine hits them alike; on a busy machine use the relative numbers only.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

import vitprune
from vitprune.measure.speed import round_robin
from vitprune.models import create_model
from vitprune.methods.base import TokenReducer, Trace
from vitprune.specs import parse_method_spec
from vitprune.tokens import TokenState

from official_peers import load_peers

DEFAULT_METHODS = ["tome:r=13", "evit:keep=0.7", "ppt:r=50", "togo:keep=0.69"]
FLOOR = 0.95  # the target: latency speedup ≥ 0.95 × MACs ratio


class FreeReduction(TokenReducer):
    """The control ``bound``: keep the first ``counts[layer]`` tokens after each block's attention (a view).

    Same token counts as the method it stands for, zero reduction cost and no proportional attention."""

    name = "free-reduction"

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def reduce(self, layer: int, state: TokenState, scores: object, trace: Trace) -> TokenState:
        n = self.counts[layer]
        if n == state.num_tokens:
            return state
        return replace(state, x=state.x[:, :n], index=None if state.index is None else state.index[:, :n])


@dataclass
class Config:
    label: str
    model: nn.Module
    macs: float  # per image
    kind: str  # "unpatched", "method", "engine", "bound", "peer"
    compiled: Callable | None = None
    compile_error: str | None = None


def build_configs(base: nn.Module, specs: list[str], x: torch.Tensor, peers: list[str]) -> list[Config]:
    """Unpatched, the engine alone, per method: the patched model and its free-reduction bound; the official peers."""
    configs = [Config("unpatched", base, vitprune.count_macs(base, x).macs, "unpatched")]
    for spec in ["tome:r=0", *specs]:
        model = copy.deepcopy(base)
        name, config = parse_method_spec(spec)
        vitprune.patch(model, name, **config)
        macs = vitprune.count_macs(model, x).macs
        configs.append(Config(spec, model, macs, "engine" if spec == "tome:r=0" else "method"))
        if spec == "tome:r=0":
            continue
        with torch.inference_mode():
            model(x)
        counts = vitprune.last_trace(model).tokens_mlp
        bound = vitprune.patch(copy.deepcopy(base), FreeReduction(counts))
        configs.append(Config(f"  bound for {spec}", bound, vitprune.count_macs(bound, x).macs, "bound"))
    for peer in load_peers(peers, base, x):
        model = peer.patch(base)
        configs.append(Config(peer.label, model, vitprune.count_macs(model, x).macs, "peer"))
    return configs


def compile_all(configs: list[Config], x: torch.Tensor, freezing: bool, say: Callable[[str], None]) -> None:
    """``torch.compile(fullgraph=True)`` each model and run it until it stops compiling (excluded from timing)."""
    # every model compiles timm's one forward code object: let each have its own entry
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(configs))
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * len(configs))
    with torch.inference_mode(), torch._inductor.config.patch(freezing=freezing):
        for i, c in enumerate(configs):
            say(f"compiling {i + 1}/{len(configs)}: {c.label.strip()}")
            compiled = torch.compile(c.model, fullgraph=c.kind != "peer")
            try:
                for _ in range(2):
                    compiled(x)
            except Exception as e:  # only a peer may fail: ours must compile, so let it raise
                if c.kind != "peer":
                    raise
                c.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                say(f"  {c.label} does not compile ({c.compile_error}); timed eager only")
                continue
            c.compiled = compiled


def time_all(configs: list[Config], x: torch.Tensor, args: argparse.Namespace, say: Callable[[str], None]
             ) -> tuple[list[float], list[float | None]]:
    """Median seconds per forward of every configuration, eager and compiled, all in one round-robin."""
    def call(f: Callable) -> Callable[[], object]:
        return lambda: f(x)

    fns = [call(c.model) for c in configs]
    compiled_at = [i for i, c in enumerate(configs) if c.compiled is not None]
    fns += [call(configs[i].compiled) for i in compiled_at]
    with torch.inference_mode():
        times = round_robin([(lambda: None, f) for f in fns], threads=args.threads, rounds=args.rounds,
                            min_round_time=args.min_round_time, warmup=3, on_round=say).times
    medians = [statistics.median(t) for t in times]
    eager = medians[:len(configs)]
    compiled: list[float | None] = [None] * len(configs)
    for i, t in zip(compiled_at, medians[len(configs):]):
        compiled[i] = t
    return eager, compiled


def report(configs: list[Config], eager: list[float], compiled: list[float | None]) -> bool:
    """Print the table and the checks; True when every method meets the floor in its best path."""
    base_macs, base_eager, base_comp = configs[0].macs, eager[0], compiled[0]
    head = (f"{'config':<30} {'GMACs':>6} {'MACs×':>6} {'eager ms':>9} {'eager×':>7} {'/MACs':>6} "
            f"{'comp ms':>8} {'comp×':>6} {'/MACs':>6}  check")
    print(head)
    print("-" * len(head))
    ok = True
    for c, te, tc in zip(configs, eager, compiled):
        ratio = base_macs / c.macs
        se = base_eager / te
        sc = None if tc is None or base_comp is None else base_comp / tc
        best = max(se, sc or 0.0)
        check = ""
        if c.kind == "method":
            passed = best >= FLOOR * ratio
            ok &= passed
            check = f"best {best / ratio:.2f} of MACs ratio: " + ("ok" if passed else f"below {FLOOR}")
        comp = f"{'–':>8} {'–':>6} {'–':>6}" if sc is None else f"{tc * 1e3:8.2f} {sc:6.2f} {sc / ratio:6.2f}"
        if c.compile_error:
            check = f"does not compile: {c.compile_error}"
        print(f"{c.label:<30} {c.macs / 1e9:6.2f} {ratio:6.2f} {te * 1e3:9.2f} {se:7.2f} {se / ratio:6.2f} "
              f"{comp}  {check}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-round-time", type=float, default=0.5, help="seconds per configuration per round")
    ap.add_argument("--method", action="append", default=None, help="method spec; repeat (default: the four)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes minutes on a CPU)")
    ap.add_argument("--no-freezing", action="store_true", help="plain torch.compile (weights not frozen/pre-packed)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=DIR",
                    help="also time the official code from a clone: tome=DIR (facebookresearch/ToMe), "
                         "ppt=DIR (xjwu1024/PPT)")
    args = ap.parse_args()

    def say(message: str) -> None:
        print(message, flush=True)

    torch.manual_seed(0)
    base = create_model(args.model)
    x = torch.randn(1, 3, *base.patch_embed.img_size)
    configs = build_configs(base, args.method or DEFAULT_METHODS, x, args.peer)
    if not args.no_compile:
        compile_all(configs, x, not args.no_freezing, say)
    eager, compiled = time_all(configs, x, args, say)
    mode = "" if args.no_compile else ", compiled " + ("without" if args.no_freezing else "with") + " freezing"
    print(f"\n{args.model}: batch 1, {args.threads} threads, fp32, cpu, torch {torch.__version__}{mode}, "
          f"median of {args.rounds} interleaved rounds; speedups against the unpatched model in the same mode")
    ok = report(configs, eager, compiled)
    print(f"all methods ≥ {FLOOR} × MACs ratio" if ok else f"some methods below {FLOOR} × MACs ratio")


if __name__ == "__main__":
    main()
