"""Reduction-aware attention: one fused SDPA call for the output, scores only when a method asks for them.

Proportional attention (ToMe): a token that stands for ``s`` patches gets ``log(s)`` added to its logit, which is
the same as repeating it ``s`` times. It is passed to SDPA as a float mask, so the fused kernel still runs.
CLS attention (EViT, PPT, ToGo, selectors) is computed as one row ``softmax(q_cls · Kᵀ)`` per head instead of
materialising the N×N matrix. A model without a CLS token (SigLIP) has no such row; there the importance of a token
is the attention it *receives*: the size-weighted mean over all queries of their attention rows (the N×N matrix,
computed only at the blocks that reduce).

Training a learned selector needs *masked* attention instead (DynamicViT/SPViT): dropped tokens stay in the tensor
so shapes are static, but no token attends to them, and the mask's gradient reaches the selector. That, and an
approximate exponential (HeatViT's polynomial softmax), take the explicit path: logits, masked softmax, ``@ v``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def size_bias(size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, N, 1] sizes → [B, 1, 1, N] additive logits ``log(size)``, or None when every size is 1."""
    if size is None:
        return None
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


class AttentionScores:
    """What a block's attention exposes to the method: q, k, v per head and derived scores, computed lazily.

    The lazy scores are memoised in a plain dict rather than with ``functools.cached_property``: on Python < 3.12
    that takes an ``RLock``, a context manager torch.compile cannot trace (``fullgraph=True`` failed on it).
    """

    def __init__(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, keep: Tensor | None = None
    ) -> None:
        self.q, self.k, self.v = q, k, v  # [B, H, N, D]
        self.scale = scale
        self.bias = bias  # [B, 1, 1, N] or None
        self.keep = keep  # [B, N] key mask (selector training) or None
        self._memo: dict[str, Tensor] = {}

    def _once(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def cls_attn(self) -> Tensor:
        """[B, H, N]: attention of the first token (CLS) to every token, per head, size bias included."""
        return self._once("cls_attn", self._cls_attn)

    def _cls_attn(self) -> Tensor:
        logits = (self.q[:, :, :1] * self.scale) @ self.k.transpose(-2, -1)  # [B, H, 1, N]
        if self.bias is not None:
            logits = logits + self.bias
        if self.keep is not None:
            return masked_softmax(logits, self.keep).squeeze(2).to(self.q.dtype)
        return logits.float().softmax(dim=-1).squeeze(2).to(self.q.dtype)

    @property
    def received_attn(self) -> Tensor:
        """[B, H, N]: the attention each token receives, averaged over the queries, each query weighted by its size.

        For models without a CLS token. It asks every token where it looks, not one token, and weighting queries by
        size makes a merged token count like the copies it stands for, as proportional attention does for keys.
        """
        return self._once("received_attn", self._received_attn)

    def _received_attn(self) -> Tensor:
        logits = (self.q * self.scale) @ self.k.transpose(-2, -1)  # [B, H, N, N]
        if self.bias is not None:
            logits = logits + self.bias
        attn = masked_softmax(logits, self.keep)  # float32
        w = torch.ones_like(attn[:, :1, :1, :]) if self.bias is None else self.bias.float().exp()  # [B, 1, 1, N]
        if self.keep is not None:
            w = w * self.keep.float()[:, None, None, :]
        w = w.transpose(-2, -1)  # [B, 1, N, 1]: a weight per query
        return ((attn * w).sum(dim=2) / w.sum(dim=2).clamp_min(MASK_EPS)).to(self.q.dtype)

    def token_attn(self, has_cls: bool) -> Tensor:
        """[B, H, N] attention-based token importance: the CLS row (``cls_attn``), or ``received_attn`` without CLS."""
        return self.cls_attn if has_cls else self.received_attn

    @property
    def mean_keys(self) -> Tensor:
        """[B, N, D]: keys averaged over heads (ToMe's similarity metric)."""
        return self._once("mean_keys", lambda: self.k.mean(dim=1))

    @property
    def value_norms(self) -> Tensor:
        """[B, N]: ‖v_j‖₂ over all heads concatenated (PPT's importance factor)."""
        return self._once("value_norms", lambda: self.v.pow(2).sum(dim=(1, 3)).sqrt())


# An attention module carrying this attribute (a callable) has its softmax's exp replaced by it; the hardware path
# sets it to swap in the polynomial exp, and removes it to swap back.
EXP_ATTR = "vitprune_exp"
MASK_EPS = 1e-6  # DynamicViT's: keeps a row whose every key is masked finite


def masked_softmax(logits: Tensor, keep: Tensor | None, exp: Callable[[Tensor], Tensor] = torch.exp) -> Tensor:
    """Softmax over the last dim where key j counts with weight ``keep[b, j]`` ∈ [0, 1] (a token always sees itself).

    With ``keep`` all ones this is the plain softmax up to ``MASK_EPS``; with a hard 0/1 ``keep`` it is the softmax
    over the kept keys, and its gradient still reaches ``keep`` (multiplicative, never ``log(0)``).
    """
    logits = logits.float()
    e = exp(logits - logits.amax(dim=-1, keepdim=True))
    if keep is None:
        return e / e.sum(dim=-1, keepdim=True)
    n = logits.shape[-1]
    policy = keep.to(e.dtype)[:, None, None, :]  # [B, 1, 1, N]
    eye = torch.eye(n, dtype=e.dtype, device=e.device)
    if logits.shape[-2] != n:  # queries are a subset (e.g. the CLS row alone): they are the first tokens
        eye = eye[: logits.shape[-2]]
    policy = policy + (1.0 - policy) * eye
    e = e * policy
    return (e + MASK_EPS / n) / (e.sum(dim=-1, keepdim=True) + MASK_EPS)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    size: Tensor | None,
    keep: Tensor | None = None,
    exp: Callable[[Tensor], Tensor] | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, AttentionScores]:
    """Attention over [B, H, N, D] inputs with the size bias; returns ([B, H, N, D] output, lazy scores).

    ``keep`` [B, N] masks keys (selector training); ``exp`` replaces ``torch.exp`` inside the softmax (e.g. the
    polynomial one). Either selects the explicit path; otherwise one fused SDPA call.
    """
    bias = size_bias(size, q.dtype)
    if keep is not None and exp is None and not keep.requires_grad:
        # a fixed 0/1 mask (padding of per-image token counts at inference): -inf logits, still one SDPA call
        pad = torch.zeros_like(keep, dtype=q.dtype).masked_fill(keep <= 0, float("-inf"))[:, None, None, :]
        bias, keep = (pad if bias is None else bias + pad), None
    if keep is not None or exp is not None:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        attn = masked_softmax(logits, keep, exp or torch.exp).to(q.dtype)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v, AttentionScores(q, k, v, scale, bias, keep)
    if bias is not None:
        # An expanded mask lets the CPU flash kernel skip its own broadcast bookkeeping (measured faster).
        mask = bias.expand(-1, q.shape[1], q.shape[2], -1)
    else:
        mask = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out, AttentionScores(q, k, v, scale, bias)
