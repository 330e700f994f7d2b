"""Reduction-aware attention: one fused SDPA call for the output, scores only when a method asks for them.

Proportional attention (ToMe): a token that stands for ``s`` patches gets ``log(s)`` added to its logit, which is
the same as repeating it ``s`` times. It is passed to SDPA as a float mask, so the fused kernel still runs.
CLS attention (EViT, PPT, ToGo, selectors) is computed as one row ``softmax(q_cls · Kᵀ)`` per head instead of
materialising the N×N matrix.
"""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


def size_bias(size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, N, 1] sizes → [B, 1, 1, N] additive logits ``log(size)``, or None when every size is 1."""
    if size is None:
        return None
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


class AttentionScores:
    """What a block's attention exposes to the method: q, k, v per head and derived scores, computed lazily."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None) -> None:
        self.q, self.k, self.v = q, k, v  # [B, H, N, D]
        self.scale = scale
        self.bias = bias  # [B, 1, 1, N] or None

    @cached_property
    def cls_attn(self) -> Tensor:
        """[B, H, N]: attention of the first token (CLS) to every token, per head, size bias included."""
        logits = (self.q[:, :, :1] * self.scale) @ self.k.transpose(-2, -1)  # [B, H, 1, N]
        if self.bias is not None:
            logits = logits + self.bias
        return logits.float().softmax(dim=-1).squeeze(2).to(self.q.dtype)

    @cached_property
    def mean_keys(self) -> Tensor:
        """[B, N, D]: keys averaged over heads (ToMe's similarity metric)."""
        return self.k.mean(dim=1)

    @cached_property
    def value_norms(self) -> Tensor:
        """[B, N]: ‖v_j‖₂ over all heads concatenated (PPT's importance factor)."""
        return self.v.pow(2).sum(dim=(1, 3)).sqrt()


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, size: Tensor | None, dropout_p: float = 0.0
) -> tuple[Tensor, AttentionScores]:
    """Attention over [B, H, N, D] inputs with the size bias; returns ([B, H, N, D] output, lazy scores)."""
    bias = size_bias(size, q.dtype)
    if bias is not None:
        # An expanded mask lets the CPU flash kernel skip its own broadcast bookkeeping (measured faster).
        mask = bias.expand(-1, q.shape[1], q.shape[2], -1)
    else:
        mask = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out, AttentionScores(q, k, v, scale, bias)
