"""One table of fp32 vs int8 vs int8 + polynomial non-linearities, each with and without token methods.

Every precision starts from a fresh copy of the model (quantization swaps layers in place), is calibrated on the
same batches, and is evaluated unpatched and under each method spec. With ``int8+poly`` the "unpatched" row runs
through the engine with no reduction (``tome:r=0``) so the polynomial softmax, which lives in the engine's
attention, is used too.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import patching
from ..measure.accuracy import evaluate
from ..measure.flops import count_macs
from ..measure.report import BenchRow
from ..specs import format_method_spec, parse_method_spec
from .quant import calibrate, quantize

PRECISIONS = ("fp32", "int8", "int8+poly")


def precision_rows(model: nn.Module, model_name: str, specs: Sequence[str], data: Any, calibration: list[torch.Tensor],
                   *, per_channel: bool = False, precisions: Sequence[str] = PRECISIONS,
                   on_step: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Top-1 and GMACs for each precision × (unpatched + specs); deltas are against fp32 unpatched."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    if not calibration:
        raise ValueError("quantization needs at least one calibration batch")
    step = on_step or (lambda _m: None)
    configs = [("none", {})] + [parse_method_spec(s) for s in specs]
    example = calibration[0][:1]
    rows: list[BenchRow] = []
    for precision in precisions:
        net = copy.deepcopy(model).eval()
        if precision != "fp32":
            quantize(net, per_channel=per_channel, poly=precision == "int8+poly")
            calibrate(net, calibration)
        for name, config in configs:
            if name == "none" and precision == "int8+poly":
                name, config = "tome", {"r": 0}  # the engine, no reduction: polynomial softmax included
            label = format_method_spec(name, config)
            step(f"{precision} {label}")
            if name != "none":
                patching.patch(net, name, **config)
            top1 = evaluate(net, data, progress=False).top1
            gmacs = count_macs(net, example).gmacs
            describe = net._vitprune.method.describe() if patching.is_patched(net) else "unpatched"
            rows.append(BenchRow(model=model_name, method="none" if label in ("none", "tome:r=0") else name,
                                 config=f"{precision} · {describe}", gmacs=gmacs, macs_ratio=1.0, top1=top1,
                                 extra={"precision": precision, "spec": label}))
            if patching.is_patched(net):
                patching.unpatch(net)
    base = rows[0]
    for row in rows:
        row.macs_ratio = base.gmacs / row.gmacs
        row.top1_delta = row.top1 - base.top1
    return rows
