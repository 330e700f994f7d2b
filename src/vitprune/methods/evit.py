"""EViT — Expediting ViTs via token reorganization (Liang et al., ICLR 2022).

At the chosen blocks, between attention and MLP: keep the ``ceil(keep · n)`` patch tokens the CLS token attends
to most (mean over heads), and fuse the rest into one token, their sum weighted by CLS attention (as in the
paper and its code: the weights are the raw attention probabilities, not renormalised). The fused token is
an ordinary token afterwards, so a later block may keep or fuse it again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..attention import AttentionScores
from ..registry import register_method
from ..tokens import PACKAGE_INDEX, TokenState, append_token, gather_tokens, with_prefix
from .base import ModelInfo, TokenReducer, Trace, check_blocks, check_keep, per_block


def keep_count(keep: float, n: int) -> int:
    """Tokens EViT keeps out of ``n`` candidates (the reference rounds up)."""
    return min(n, math.ceil(keep * n))


def topk_and_fuse(state: TokenState, importance: torch.Tensor, k: int, fuse: bool) -> TokenState:
    """Keep the ``k`` most important patch tokens (descending order); optionally fuse the rest into one token.

    ``importance``: [B, N] over all tokens (prefix included); the fused token is Σ importance_j · x_j.
    """
    p = state.num_prefix
    patch_importance = importance[:, p:]
    order = patch_importance.argsort(dim=1, descending=True)
    kept = gather_tokens(state, with_prefix(order[:, :k], p))
    if not fuse or k == patch_importance.shape[1]:
        return kept
    rest = order[:, k:] + p
    w = importance.gather(1, rest).unsqueeze(-1).to(state.x.dtype)  # [B, R, 1]
    x_rest = state.x.gather(1, rest.unsqueeze(-1).expand(-1, -1, state.x.shape[-1]))
    fused_x = (w * x_rest).sum(dim=1)
    fused_size = state.sizes().gather(1, rest.unsqueeze(-1)).sum(dim=(1, 2))
    fused_source = None
    if state.source is not None:
        fused_source = state.source.gather(1, rest.unsqueeze(-1).expand(-1, -1, state.source.shape[-1])).amax(1)
    fused_index = torch.full_like(rest[:, 0], PACKAGE_INDEX)
    return append_token(kept, fused_x, fused_size, fused_source, fused_index)


@register_method("evit")
@dataclass
class EViT(TokenReducer):
    """``vitprune.patch(model, "evit", keep=0.7, blocks=(3, 6, 9))``; ``keep=1.0`` is the identity."""

    keep: float | Sequence[float] = 0.7
    blocks: Sequence[int] = (3, 6, 9)
    fuse: bool = True
    prop_attn: bool = False

    def setup(self, info: ModelInfo) -> None:
        self.has_cls = info.has_cls  # without CLS (SigLIP): the attention each token receives ranks it
        keeps = per_block(self.keep, check_blocks(self.blocks, info.depth, "evit"), "evit keep")
        self.keep_at = {b: check_keep(k) for b, k in keeps.items()}
        self.blocks = tuple(keeps)

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        keep = self.keep_at.get(layer)
        if keep is None or keep >= 1.0:
            return state
        k = keep_count(keep, state.num_patches)
        if k >= state.num_patches:
            return state
        return topk_and_fuse(state, scores.token_attn(self.has_cls).mean(dim=1), k, self.fuse)

    def describe(self) -> str:
        blocks = ",".join(str(b) for b in self.blocks)
        return f"keep={self.keep}@{blocks}"
