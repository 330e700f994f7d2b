"""ToMe — Token Merging (Bolya et al., ICLR 2023).

In every block, between attention and MLP: split the tokens alternately into sets A and B, match each A token
to its most similar B token (cosine similarity of head-averaged keys), and merge the ``r`` most similar pairs
by size-weighted average. Prefix tokens (CLS, distillation, registers) are never merged. Attention is
proportional: logits get ``log(size)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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
    plan = match_tokens(metric, r, num_prefix)
    if plan is None:
        return _identity, _identity
    return plan.merge, plan.layout


def match_tokens(metric: Tensor, r: int, num_prefix: int) -> MergePlan | None:
    """The matching of :func:`bipartite_soft_matching` as a :class:`MergePlan`; None when nothing can merge."""
    n = metric.shape[1]
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens that fall in A / in B
    r = min(r, (n - num_prefix) // 2, (n + 1) // 2 - pa)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2][:, pa:], metric[:, 1::2][:, pb:]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # unmerged A tokens, kept in spatial order
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        return _merge_plan(n, num_prefix, unm_idx, src_idx, dst_idx)


class MergePlan:
    """One ToMe merge as row indices into the flattened batch ([B·N, C] → [B·N', C]).

    Each output row starts as a copy of one input row (``rep``: prefix, unmerged A, B) and every merged A row is
    then added (``index_add_``) or reduced into its B row, in match order — the same additions as the official
    ``scatter_reduce`` on the B tokens, so the numbers are identical, with three ops per merge instead of split,
    two gathers, a scatter and a concatenation. ``index_select``/``index_add_`` on rows are also the cheapest
    indexing ops on CPU (one contiguous row copy per index, no expanded index tensors).
    """

    def __init__(self, batch: int, n: int, n_out: int, rep: Tensor, src: Tensor, dst: Tensor) -> None:
        self.batch, self.n, self.n_out = batch, n, n_out
        self.rep, self.src, self.dst = rep, src, dst  # flat row indices: [B·N'], [B·r] (input), [B·r] (output)

    def _rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(self.batch * self.n, *x.shape[2:])
        return flat.index_select(0, self.rep), flat.index_select(0, self.src)

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        out, src = self._rows(x)
        if mode == "sum":
            out = out.index_add_(0, self.dst, src)
        else:  # "amax" (source maps, keep masks), "mean": off the hot path
            index = self.dst.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
            out = out.scatter_reduce_(0, index, src, reduce=mode, include_self=True)
        return out.view(self.batch, self.n_out, *x.shape[2:])

    def layout(self, x: Tensor, mode: str = "keep") -> Tensor:
        flat = x.reshape(self.batch * self.n, *x.shape[2:])
        return flat.index_select(0, self.rep).view(self.batch, self.n_out, *x.shape[2:])


def _merge_plan(n: int, num_prefix: int, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor) -> MergePlan:
    """Row indices of one merge, from positions within A (``unm_idx``, ``src_idx`` [B, ·]) and B (``dst_idx``)."""
    batch, kept_a = unm_idx.shape
    pa = (num_prefix + 1) // 2
    n_out = num_prefix + kept_a + n // 2 - num_prefix // 2  # prefix, unmerged A, all of B
    prefix, b_pos, offsets = _fixed_rows(n, num_prefix, batch, unm_idx.device)
    # A token i sits at position 2(i + pa), B token j at 2(j + pb) + 1
    rep = torch.cat([prefix, torch.add(2 * pa, unm_idx, alpha=2), b_pos], dim=1)
    src = torch.add(2 * pa, src_idx, alpha=2)
    dst = dst_idx + (num_prefix + kept_a)
    if offsets is not None:  # rows of image i start at i·N (input) and i·N' (output)
        rep, src, dst = rep + offsets * n, src + offsets * n, dst + offsets * n_out
    return MergePlan(batch, n, n_out, rep.reshape(-1), src.reshape(-1), dst.reshape(-1))


def _fixed_rows(n: int, num_prefix: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """([B, P] prefix rows, [B, N_B] B rows, [B, 1] image numbers or None at batch 1): the parts of a plan that
    depend only on the shapes. Eager inference pays ~10 µs per op at batch 1, so they are built once per shape;
    under torch.compile they are built in the graph (constants to Inductor) instead of read from a Python cache."""
    if torch.compiler.is_compiling():
        return _build_fixed_rows(n, num_prefix, batch, device)
    key = (n, num_prefix, batch, device)
    rows = _FIXED_ROWS.get(key)
    if rows is None:
        if len(_FIXED_ROWS) >= 256:  # many shapes (dynamic image sizes): start over rather than grow
            _FIXED_ROWS.clear()
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            rows = _FIXED_ROWS[key] = _build_fixed_rows(n, num_prefix, batch, device)
    return rows


_FIXED_ROWS: dict[tuple, tuple[Tensor, Tensor, Tensor | None]] = {}


def _build_fixed_rows(n: int, num_prefix: int, batch: int, device: torch.device) -> tuple:
    prefix = torch.arange(num_prefix, device=device).expand(batch, num_prefix)
    b_pos = torch.arange(2 * (num_prefix // 2) + 1, n, 2, device=device).expand(batch, -1)
    offsets = torch.arange(batch, device=device).unsqueeze(1) if batch > 1 else None
    return prefix, b_pos, offsets


def merge_wavg(state: TokenState, plan: MergePlan) -> TokenState:
    """``tokens.merge_tokens(state, plan.merge, plan.layout)`` in fewer ops, for the states inference sees.

    ``x·size`` and ``size`` go through one merge as one tensor (the size as an extra channel), and before the first
    merge (no sizes yet, all ones) the product is ``x`` itself. The same additions happen in the same order, so the
    numbers are identical; a state with a source map, keep mask or rotary positions takes ``merge_tokens``.
    """
    x, size = state.x, state.size
    if state.source is not None or state.keep is not None or state.pos is not None or (
            size is not None and size.dtype != x.dtype):
        return merge_tokens(state, plan.merge, plan.layout)
    ones = x.new_ones(*x.shape[:-1], 1) if size is None else size
    merged = plan.merge(torch.cat([x if size is None else x * size, ones], dim=-1), "sum")
    new_size = merged[..., -1:]
    index = None if state.index is None else plan.layout(state.index.unsqueeze(-1)).squeeze(-1)
    return replace(state, x=merged[..., :-1] / new_size, size=new_size, index=index)


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
        plan = match_tokens(scores.mean_keys, r, state.num_prefix)
        return state if plan is None else merge_wavg(state, plan)

    def describe(self) -> str:
        return f"r={self.r}"
