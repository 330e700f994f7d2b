"""ToMe — Token Merging (Bolya et al., ICLR 2023).

In every block, between attention and MLP: split the tokens alternately into sets A and B, match each A token
to its most similar B token (cosine similarity of head-averaged keys), and merge the ``r`` most similar pairs
by size-weighted average. Prefix tokens (CLS, distillation, registers) are never merged. Attention is
proportional: logits get ``log(size)``.
"""
from __future__ import annotations

from dataclasses import dataclass
import numbers
from typing import Sequence

import torch
from torch import Tensor

from ..attention import AttentionScores
from ..registry import register_method
from ..tokens import MergeFn, TokenState, merge_tokens
from .base import ModelInfo, TokenReducer, Trace, is_whole


def _identity(x: Tensor, mode: str = "keep") -> Tensor:
    return x


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> tuple[MergeFn, MergeFn]:
    """ToMe's matching on ``metric`` [B, N, D]; returns (merge, layout) closures that drop ``r`` tokens.

    Tokens at even positions form A, odd positions B (prefix tokens included, so the split is the one the
    official code uses for CLS and CLS+distillation models). Output order: prefix tokens, unmerged A tokens in
    their original order, then B tokens (each holding what was merged into it).
    """
    n = metric.shape[1]
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens that fall in A / in B
    r = min(r, (n - num_prefix) // 2, (n + 1) // 2 - pa)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2][:, pa:], metric[:, 1::2][:, pb:]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True).unsqueeze(-1)
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # unmerged A tokens, kept in spatial order
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.unsqueeze(-1).gather(1, src_idx)

    def split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x[:, :num_prefix], x[:, ::2][:, pa:], x[:, 1::2][:, pb:]

    def take(t: Tensor, idx: Tensor) -> Tensor:
        return t.gather(1, idx.expand(-1, -1, t.shape[-1]))

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        prefix, src, dst = split(x)
        unm = take(src, unm_idx)
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, x.shape[-1]), take(src, src_idx), reduce=mode)
        return torch.cat([prefix, unm, dst], dim=1)

    def layout(x: Tensor, mode: str = "keep") -> Tensor:
        prefix, src, dst = split(x)
        return torch.cat([prefix, take(src, unm_idx), dst], dim=1)

    return merge, layout


def merge_schedule(depth: int, r: int | tuple[int, float] | Sequence[int]) -> list[int]:
    """Tokens to merge per block, read as the official ToMe reads ``r``: an int for every block; a **tuple**
    ``(r, inflection)`` for a linear ramp from r·(1−inflection) to r·(1+inflection) (decreasing/increasing
    schedules); a **list** with one value per block (blocks past its end merge nothing). Every count is a whole
    number >= 0; fractions are refused rather than truncated."""
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(
                f"ToMe r as a tuple is (r, inflection), got {len(r)} values {r!r}; give a per-block schedule as a list"
            )
        base, inflection = r
        if not is_whole(base) or base < 0 or isinstance(inflection, bool) or not isinstance(inflection, numbers.Real):
            raise ValueError(f"ToMe r=(r, inflection) needs a whole r >= 0 and a number inflection, got {r!r}")
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"ToMe inflection must be in [-1, 1], got {inflection}")
        lo = int(base * (1.0 - inflection))
        hi = 2 * base - lo
        step = (hi - lo) / max(depth - 1, 1)
        return [int(lo + step * i) for i in range(depth)]
    if is_whole(r):
        values = [int(r)] * depth
    elif isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) > depth:
            raise ValueError(f"ToMe got {len(r)} per-block r values for a model with {depth} blocks")
        if not all(is_whole(v) for v in r):
            raise ValueError(f"ToMe per-block r must be whole numbers of tokens, got {list(r)}")
        values = [int(v) for v in r] + [0] * (depth - len(r))
    else:
        raise ValueError(f"ToMe r must be an int, (r, inflection) or a per-block list, got {r!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"ToMe r must be >= 0 in every block, got {values}")
    return values


@register_method("tome")
@dataclass
class ToMe(TokenReducer):
    """``vitprune.patch(model, "tome", r=13)``; ``r=0`` is the identity."""

    r: int | tuple[int, float] | Sequence[int] = 8
    prop_attn: bool = True

    def setup(self, info: ModelInfo) -> None:
        self.schedule = merge_schedule(info.depth, self.r)

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        r = self.schedule[layer]
        if r <= 0:
            return state
        merge, layout = bipartite_soft_matching(scores.mean_keys, r, state.num_prefix)
        if merge is _identity:
            return state
        return merge_tokens(state, merge, layout)

    def describe(self) -> str:
        return f"r={self.r}"
