"""MACs from the ops a forward pass actually executes (``torch.utils.flop_counter.FlopCounterMode``).

Units: a MAC is one multiply-accumulate; FLOPs = 2 x MACs. The "FLOPs"/"GFLOPs" in token-pruning papers
(DeiT-S "4.6G", ToMe, EViT, ...) are in fact MACs, so this module reports MACs to be comparable.

Only matmul-like ops are counted (mm/addmm/bmm/matmul, convolution, scaled-dot-product attention) —
exactly what papers count; softmax, LayerNorm, GELU, adds, gathers and token sorting are free here.
Counting executed ops (rather than a formula) means a token-reduction method is charged for the
tokens it really processes, including any extra matmuls its scoring/merging does.

The counter is given formulas for every attention op the installed torch may run (``op_formulas``), and a forward
that runs a matmul-like op with no formula raises ``UncountedOpError`` instead of reporting a figure that misses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .op_formulas import is_matmul_like, missing_formulas


class UncountedOpError(RuntimeError):
    """A forward ran matmul-like ops that the flop counter has no formula for: its MACs would be too low."""


class _OpsSeen(TorchDispatchMode):
    """Records the name of every op a forward dispatches (next to the flop counter, which sees the same ops)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        packet = getattr(func, "overloadpacket", func)
        self.ops.setdefault(str(packet), packet)
        return func(*args, **(kwargs or {}))


@dataclass
class MacsCount:
    """MACs per image (the batch total divided by the batch size) and the per-op breakdown."""

    macs: float  # per image
    per_op: dict[str, float] = field(default_factory=dict)  # op name -> MACs per image
    batch_size: int = 1

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def flops(self) -> float:
        """FLOPs in the strict sense (2 x MACs) — not what papers call FLOPs."""
        return 2.0 * self.macs


def count_macs(model: nn.Module, example: torch.Tensor) -> MacsCount:
    """Count MACs per image of ``model(example)`` under ``torch.no_grad()`` in eval mode.

    Modules' train/eval flags and parameters' ``requires_grad`` are restored afterwards. Parameters are frozen while
    counting: some models (timm's PiT) pass a view of a parameter into a submodule, which under no_grad still says
    ``requires_grad`` and trips the flop counter's module tracker; the ops counted are the same either way.
    For data-dependent methods the result is the batch mean, so pass a representative batch.
    """
    if example.ndim < 1 or example.shape[0] == 0:
        raise ValueError("example must be a non-empty batch, e.g. torch.randn(1, 3, 224, 224)")
    batch = int(example.shape[0])
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    counter = FlopCounterMode(display=False, custom_mapping=missing_formulas())
    seen = _OpsSeen()
    try:
        model.eval().requires_grad_(False)
        with torch.no_grad(), seen, counter:
            model(example)
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in grads.items():
            p.requires_grad_(flag)
    uncounted = sorted(name for name, op in seen.ops.items() if is_matmul_like(name) and op not in counter.flop_registry)
    if uncounted:
        raise UncountedOpError(
            f"torch {torch.__version__} ran {', '.join(uncounted)}, which its flop counter cannot count, so the MACs "
            "would be too low. Add a formula in vitprune/measure/op_formulas.py, or install the locked torch "
            "(`make setup`)."
        )
    per_op = {
        str(op).removeprefix("aten."): flops / 2 / batch
        for op, flops in counter.get_flop_counts().get("Global", {}).items()
    }
    return MacsCount(macs=counter.get_total_flops() / 2 / batch, per_op=per_op, batch_size=batch)


def paper_vit_macs(
    tokens_attn: list[int],
    tokens_mlp: list[int],
    dim: int,
    patch_embed_macs: int,
    head_macs: int,
    mlp_ratio: float = 4.0,
) -> int:
    """The papers' ViT cost formula, in MACs per image.

    Per block: ``4·N·C²`` (qkv and output projections) ``+ 2·N²·C`` (q·kᵀ and attn·v) with N the tokens
    entering the block, plus ``2·mlp_ratio·N′·C²`` for the MLP with N′ the tokens entering the MLP
    (N′ < N when a method drops tokens between attention and MLP). Plus patch embedding and head.
    """
    if len(tokens_attn) != len(tokens_mlp):
        raise ValueError(f"{len(tokens_attn)} attention token counts but {len(tokens_mlp)} MLP token counts")
    c = dim
    total = float(patch_embed_macs + head_macs)
    for n, n_mlp in zip(tokens_attn, tokens_mlp):
        total += 4 * n * c * c + 2 * n * n * c + 2 * mlp_ratio * n_mlp * c * c
    return int(round(total))
