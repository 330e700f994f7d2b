"""Multi-stage selector training (HeatViT's latency-aware stages): insert selectors one at a time, deepest first.

Why deepest first: later blocks tolerate pruning best, so each new, shallower selector is trained on a model that
already prunes everything after it, and the cumulative keep rates stay ordered (a shallower selector keeps at
least as much as the deeper ones).

Stage s (of S) places one selector. Candidates: the method's default block for that stage ±1 (strictly between
the neighbouring chosen selectors) × a grid of cumulative keep rates (``KEEP_GRID``, or just the configured keep
rate when there is no latency budget). With a latency LUT, a candidate is feasible when the LUT's prediction for
all selectors chosen so far plus this one is within the stage's share of the budget,
``full − (full − budget)·s/S``; the (up to ``MAX_PROBES``) feasible candidates with the most tokens are each
trained briefly from the selectors so far, and the one whose pruned model agrees best with the unpruned teacher on
held-out images (top-1 agreement, label-free) wins. The stage is then trained for its share of the steps. Every
candidate, its predicted latency and fidelity, and the choice go to ``multistage.json``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .. import patching
from ..methods.selector import TokenSelector, expected_tokens
from .loop import TrainConfig, TrainResult, train
from .lut import LatencyLUT

KEEP_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)
MAX_PROBES = 3


def _fidelity(folder: Path, cfg: TrainConfig, val: Any, teacher) -> float:
    from ..measure.accuracy import fidelity
    from .checkpoint import load

    student = load(cfg.model, folder, checkpoint=cfg.checkpoint)
    student = student.to(next(teacher.parameters()).device)
    return fidelity(teacher, student, val, batch_size=256).top1_agreement or 0.0


def train_multistage(cfg: TrainConfig, val: Any, log: Callable[[str], None] = print,
                     on_step: Callable[[int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run the stages; returns the last stage's result (its folder is ``cfg.out``)."""
    from ..models import create_model

    base = create_model(cfg.model, checkpoint=cfg.checkpoint)
    teacher = copy.deepcopy(base).to(cfg.device).eval()
    probe = patching.patch(base, cfg.method, **cfg.method_config)
    method: TokenSelector = probe._vitprune.method
    info = probe._vitprune.info
    if not isinstance(method, TokenSelector):
        raise ValueError("multi-stage training places learned selectors; use --method heatvit or spvit")
    lut = budget = None
    if cfg.lut is not None:
        lut = LatencyLUT.load(cfg.lut)
        lut.check_model(info)
        budget = cfg.target_latency_ms if cfg.target_latency_ms is not None else lut.full_ms() / cfg.target_speedup
    defaults, target_keep = list(method.blocks), dict(method.keep_at)
    n_stages = len(defaults)
    stage_steps = max(1, cfg.steps // n_stages)
    probe_steps = max(1, stage_steps // 4)
    chosen: dict[int, float] = {}
    record: dict[str, Any] = {"order": "deepest first", "budget_ms": budget,
                              "full_ms": None if lut is None else lut.full_ms(), "stages": []}
    out = Path(cfg.out)
    previous: str | None = None
    result: TrainResult | None = None
    for s, default in enumerate(reversed(defaults), start=1):
        deeper = min(chosen) if chosen else info.depth
        positions = [b for b in (default - 1, default, default + 1) if 1 <= b < deeper and b not in chosen]
        deeper_keep = chosen[min(chosen)] if chosen else 0.0
        keeps = [k for k in KEEP_GRID if k >= deeper_keep] if lut is not None else [target_keep[default]]
        share = None if lut is None else lut.full_ms() - (lut.full_ms() - budget) * s / n_stages
        candidates = []
        for b in positions:
            for k in keeps:
                plan = {**chosen, b: k}
                ms = None
                if lut is not None:
                    tokens = expected_tokens(plan, info.depth, info.num_patches, info.num_prefix, method.package)
                    ms = float(lut.predict_ms(tokens, selectors_at=sorted(plan)))
                candidates.append({"block": b, "keep": k, "predicted_ms": ms})
        feasible = [c for c in candidates if share is None or c["predicted_ms"] <= share]
        if not feasible:  # nothing meets this stage's share: take the cheapest
            feasible = [min(candidates, key=lambda c: c["predicted_ms"])]
        feasible.sort(key=lambda c: (-(c["predicted_ms"] or 0.0), -c["keep"]))
        probes = feasible[:MAX_PROBES] if len(feasible) > 1 else feasible
        for c in probes if len(probes) > 1 else []:
            plan = {**chosen, c["block"]: c["keep"]}
            folder = out / f"stage{s}_probe_b{c['block']}_k{c['keep']}"
            train(_stage_cfg(cfg, plan, folder, probe_steps, previous))
            c["fidelity"] = _fidelity(folder, cfg, val, teacher)
            log(f"stage {s}: block {c['block']} keep {c['keep']}: predicted {c['predicted_ms']} ms, "
                f"fidelity {c['fidelity']:.4f}")
        best = max(probes, key=lambda c: c.get("fidelity", 0.0))
        chosen[best["block"]] = best["keep"]
        folder = out if s == n_stages else out / f"stage{s}"
        steps = cfg.steps - stage_steps * (n_stages - 1) if s == n_stages else stage_steps
        result = train(_stage_cfg(cfg, chosen, folder, steps, previous), on_step=on_step)
        previous = str(folder)
        record["stages"].append({"stage": s, "share_ms": share, "candidates": candidates, "probed": probes,
                                 "chosen": best, "selectors": dict(sorted(chosen.items()))})
        log(f"stage {s}: chose block {best['block']} keep {best['keep']} → selectors {dict(sorted(chosen.items()))}")
        (out / "multistage.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "multistage.json").write_text(json.dumps(record, indent=1))
    assert result is not None
    return result


def _stage_cfg(cfg: TrainConfig, plan: dict[int, float], folder: Path, steps: int, init: str | None) -> TrainConfig:
    blocks = sorted(plan)
    config = {**cfg.method_config, "blocks": blocks, "keep": [plan[b] for b in blocks]}
    # the stage trains against its keep rates (ratio loss); the LUT already chose them
    return replace(cfg, method_config=config, out=str(folder), steps=steps, resume=False, init_selectors=init,
                   lut=None, target_latency_ms=None, target_speedup=None,
                   warmup_steps=min(cfg.warmup_steps, max(1, steps // 5)))
