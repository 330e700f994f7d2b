"""One table of fp32 vs int8 vs int8 + polynomial non-linearities, each with and without token methods.

Every precision starts from a fresh copy of the model (quantization swaps layers in place), is calibrated on the
same batches, and is evaluated unpatched and under each method spec. With ``int8+poly`` the "unpatched" row runs
through the engine with no reduction (``tome:r=0``) so the polynomial softmax, which lives in the engine's
attention, is used too.

Rows are scored against labels (top-1) or, for models without a classifier or data without labels (DINOv2
features, a random-init DeiT), by fidelity to the fp32 unpatched model's outputs (cosine, top-1 agreement).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import patching
from ..measure.accuracy import compare_outputs, evaluate, outputs
from ..measure.flops import count_macs
from ..measure.report import BenchRow
from ..specs import format_method_spec, parse_method_spec
from .quant import calibrate, quantize

PRECISIONS = ("fp32", "int8", "int8+poly")
REFERENCES = ("labels", "fidelity")


def precision_rows(model: nn.Module, model_name: str, specs: Sequence[str], data: Any, calibration: list[torch.Tensor],
                   *, per_channel: bool = False, precisions: Sequence[str] = PRECISIONS,
                   on_step: Callable[[str], None] | None = None, reference: str = "labels") -> list[BenchRow]:
    """GMACs and a score for each precision × (unpatched + specs); ratios and deltas are against the first row.

    ``reference="labels"``: top-1 on labelled ``data`` (``row.top1``, ``row.top1_delta``). ``"fidelity"``: for
    feature models (no classifier) or unlabelled data, where top-1 means nothing, each row's outputs are compared
    image by image with the fp32 unpatched model's (computed once, before the table): mean cosine in
    ``row.extra["cosine"]``, argmax agreement in ``row.extra["agreement"]`` (None for 1-wide outputs and for
    feature models, ``num_classes == 0``, whose largest feature's index means nothing), and ``row.top1`` stays None. ``data``: a Dataset, a DataLoader or an iterable of image batches.
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
    if not calibration:
        raise ValueError("quantization needs at least one calibration batch")
    step = on_step or (lambda _m: None)
    configs = [("none", {})] + [parse_method_spec(s) for s in specs]
    example = calibration[0][:1]
    ref_out = None
    if reference == "fidelity":
        step("fp32 reference")
        ref_out = outputs(copy.deepcopy(model).eval(), data)  # a transient copy: ``model`` may be in train mode
    classifier = getattr(model, "num_classes", None) != 0
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
            top1, scores = _score(net, data, ref_out, classifier)
            gmacs = count_macs(net, example).gmacs
            describe = net._vitprune.method.describe() if patching.is_patched(net) else "unpatched"
            rows.append(BenchRow(model=model_name, method="none" if label in ("none", "tome:r=0") else name,
                                 config=f"{precision} · {describe}", gmacs=gmacs, macs_ratio=1.0, top1=top1,
                                 extra={"precision": precision, "spec": label, **scores}))
            if patching.is_patched(net):
                patching.unpatch(net)
    base = rows[0]
    for row in rows:
        row.macs_ratio = base.gmacs / row.gmacs
        if row.top1 is not None and base.top1 is not None:
            row.top1_delta = row.top1 - base.top1
    return rows


def _score(net: nn.Module, data: Any, ref_out: torch.Tensor | None,
           classifier: bool) -> tuple[float | None, dict[str, float | None]]:
    """(top-1, {}) against labels, or (None, {cosine, agreement}) against the reference outputs."""
    if ref_out is None:
        return evaluate(net, data, progress=False).top1, {}
    result = compare_outputs(outputs(net, data), ref_out)
    return None, {"cosine": result.cosine_mean, "agreement": result.top1_agreement if classifier else None}
