"""FLOP formulas for the attention ops that ``torch.utils.flop_counter`` may not know, and a guard for the rest.

Why: from torch 2.14 on, CPU ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which the flop counter of that release has no formula for, so
every attention matmul counted as 0 and every MACs figure was silently wrong. Here each SDPA variant torch can
dispatch to (CPU flash, the fused "overrideable" op of out-of-tree backends, the MPS math op, the in-place flash op,
``nn.MultiheadAttention``'s native fast path, and their backward ops) gets a formula. They are passed to
``FlopCounterMode(custom_mapping=...)`` only for ops the installed torch does not count itself, so a torch that
learns an op keeps its own formula and nothing global is changed.

All formulas return FLOPs (2 per multiply-accumulate), the flop counter's unit.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch

Shape = tuple[int, ...]


def attention_flops(q: Shape, k: Shape, v: Shape) -> int:
    """``q·kᵀ`` and ``attn·v`` for [..., N, Dqk] queries and [..., M, D] keys/values.

    Every leading dim of the query (batch, heads) is a separate attention; with grouped-query attention the keys and
    values have fewer heads and are shared, which costs the same per query head.
    """
    *lead, n, d_qk = q
    m, d_v = k[-2], v[-1]
    return 2 * math.prod(lead) * n * m * (d_qk + d_v)


def attention_backward_flops(q: Shape, k: Shape, v: Shape) -> int:
    """The backward as torch counts its own SDPA ops: recompute ``q·kᵀ``, then the grads of attn, v, q and k."""
    *lead, n, d_qk = q
    m, d_v = k[-2], v[-1]
    return 2 * math.prod(lead) * n * m * (3 * d_qk + 2 * d_v)


def _shape(t: Any) -> Shape:
    return tuple(t.shape)


def _forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return attention_flops(_shape(query), _shape(key), _shape(value))


def _backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return attention_backward_flops(_shape(query), _shape(key), _shape(value))


def _inplace_flash(out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    # flash layout [B, N, H, D]: heads before tokens for the formula
    q, k, v = (_shape(t) for t in (query, key, value))
    return attention_flops((q[0], q[2], q[1], q[3]), (k[0], k[2], k[1], k[3]), (v[0], v[2], v[1], v[3]))


def _native_mha(
    query: Any, key: Any, value: Any, embed_dim: int, num_head: int, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    """``nn.MultiheadAttention``'s eval fast path: q/k/v in-projections, attention and the output projection."""
    q, k = _shape(query), _shape(key)  # [B, N, E] batch-first
    b, n, e = (1, *q) if len(q) == 2 else q
    m = k[-2]
    head = e // num_head
    projections = 2 * b * e * e * (n + 2 * m + n)
    return projections + attention_flops((b, num_head, n, head), (b, num_head, m, head), (b, num_head, m, head))


def _raw(fn: Callable[..., int]) -> Callable[..., int]:
    """Mark a formula as taking the op's raw arguments (``FlopCounterMode`` otherwise passes shapes)."""
    fn._get_raw = True  # type: ignore[attr-defined]
    return fn


# op name in torch.ops.aten -> formula over the op's raw arguments. Ops absent from the installed torch are skipped.
_FORMULAS: dict[str, Callable[..., int]] = {
    "_scaled_dot_product_flash_attention_for_cpu": _forward,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _backward,
    "_scaled_dot_product_fused_attention_overrideable": _forward,
    "_scaled_dot_product_fused_attention_overrideable_backward": _backward,
    "_scaled_dot_product_attention_math_for_mps": _forward,
    "_scaled_dot_product_efficient_attention": _forward,
    "_scaled_dot_product_efficient_attention_backward": _backward,
    "_scaled_dot_product_flash_attention": _forward,
    "_scaled_dot_product_flash_attention_backward": _backward,
    "_scaled_dot_product_cudnn_attention": _forward,
    "_scaled_dot_product_cudnn_attention_backward": _backward,
    "_flash_attention_forward_no_dropout_inplace": _inplace_flash,
    "_native_multi_head_attention": _native_mha,
}


def missing_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the attention ops of this torch that its flop counter does not count, keyed by op packet."""
    from torch.utils.flop_counter import flop_registry

    found = {}
    for name, formula in _FORMULAS.items():
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            found[op] = _raw(formula)
    return found


# Ops that do matmul work: attention of any kind, matrix products, convolutions, linear layers. One of these that the
# counter has no formula for would be counted as 0 — the silent error this module exists to prevent.
_MATMUL_LIKE = re.compile(r"attention|flash|flex|mm$|mm_|matmul|(^|_)linear(_|$)|einsum|convolution|conv\dd|_mha")


def is_matmul_like(op_name: str) -> bool:
    return bool(_MATMUL_LIKE.search(op_name.rsplit(".", 1)[-1]))
