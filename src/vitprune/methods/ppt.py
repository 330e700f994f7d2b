"""PPT — Token Pruning and Pooling (Wu et al., 2024; official code xjwu1024/PPT, ``ppt_deit.py``).

At the chosen blocks (default 3, 6, 9), between the attention residual and the MLP, every image either
**prunes** or **pools** ``r`` tokens, decided per image from the spread of its token importance:

* importance of patch token j: ``s_j = (Σ_h A_h[cls, j]) · ‖v_j‖₂`` with ``A_h`` the post-softmax attention of
  head h (size bias ``log(size)`` included when ``prop_attn``), ``v_j`` the value vector of token j over all heads
  concatenated; taken over the patch tokens only (everything after the prefix) and normalised to sum 1;
* ``policy="adaptive"`` (the reference, default): **pool** if ``Var(s) < threshold``, else **prune**. ``Var`` is
  the unbiased sample variance (``torch.var``'s default, as the reference uses);
* pool = ToMe's bipartite soft matching on the head-averaged keys, size-weighted average
  (:func:`vitprune.methods.tome.bipartite_soft_matching`);
* prune = keep the ``n − r`` patch tokens of highest score, in descending score order (later ToMe A/B splits
  depend on that order), prefix first; the pruned tokens are dropped (not fused) and kept tokens keep their sizes;
* ``r = min(r, (N − 1) // 2)`` with N the tokens including CLS (the reference's clamp, so both branches leave the
  same count). With more than one prefix token (distilled DeiT, registers) the clamp is the pool branch's limit,
  ``min(r, (N − P) // 2, (N + 1) // 2 − ceil(P / 2))``, which is ``(N − 1) // 2`` for P = 1.
* attention is proportional (``logits + log(size)``) in every block (``prop_attn=True``).

Deliberate differences from the reference: the prefix (CLS, distillation, register tokens) is never scored or
pruned (the reference scores everything after CLS, so it can prune a distillation token); and a mixed batch is not
split into two sub-batches: both branches run on the whole batch and each image takes its own with one
``torch.where`` (the branch nobody takes is skipped). Each image's result is the per-image definition.

Token-count-invariant policy (``policy="adaptive_invariant"``). Scores sum to 1, so for the same *shape* of
importance distribution ``Var(s) ≈ CV² / n²`` (n patch tokens): the fixed reference threshold, tuned for n = 196,
becomes a harsher test as n falls and PPT ends up pruning every image at small n. The invariant rule thresholds the
scale-free ``Var(n·s) = n²·Var(s)`` (the squared coefficient of variation of the scores) against
``threshold · ref_tokens²``::

    pool  ⇔  Var(n · s) < threshold · ref_tokens²   ⇔   Var(s) · (n / ref_tokens)² < threshold

computed in the last form, so at ``n = ref_tokens`` (default 196) the decisions are bit-for-bit those of
``"adaptive"``. ``policy="prune"`` / ``"pool"`` force one branch for every image (ablations).

Trace notes (per forward, only at blocks that reduced, i.e. clamped r > 0):

* ``trace.notes["ppt_policy"][layer]``: BoolTensor [B] on the model's device, ``True`` where the image was
  **pooled** (merged), ``False`` where it was **pruned**. :func:`pooled_fraction` summarises it.
* ``trace.notes["ppt_var"][layer]``: FloatTensor [B], the statistic compared with ``threshold`` (``Var(s)`` for
  ``"adaptive"``, ``Var(s)·(n/ref_tokens)²`` for ``"adaptive_invariant"``); adaptive policies only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..attention import AttentionScores
from ..registry import register_method
from ..tokens import TokenState, gather_tokens, where_tokens, with_prefix
from .base import ModelInfo, TokenReducer, Trace, check_blocks, is_whole, per_block
from .tome import match_tokens, merge_wavg

POLICIES = ("adaptive", "adaptive_invariant", "prune", "pool")


def clamp_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """Tokens PPT removes from ``num_tokens`` (prefix included): the reference's ``min(r, (N − 1) // 2)``,
    generalised to several prefix tokens as the most the pool branch can merge (identical for one prefix token)."""
    pa = (num_prefix + 1) // 2  # prefix tokens that fall in ToMe's set A
    return max(0, min(r, (num_tokens - num_prefix) // 2, (num_tokens + 1) // 2 - pa))


def importance(scores: AttentionScores, num_prefix: int, has_cls: bool = True) -> Tensor:
    """[B, n] float32 PPT score of the patch tokens: (Σ_h CLS attention)·‖v‖₂, normalised to sum 1 per image.
    Without a CLS token the received attention stands in for the CLS row (see ``AttentionScores.token_attn``)."""
    s = scores.token_attn(has_cls).float().sum(dim=1) * scores.value_norms.float()
    s = s[:, num_prefix:]
    return s / s.sum(dim=1, keepdim=True)


def policy_statistic(score: Tensor, invariant: bool = False, ref_tokens: int = 196) -> Tensor:
    """[B] the value PPT compares with its threshold: ``Var(s)`` (unbiased), or ``Var(s)·(n/ref_tokens)²``
    (= ``Var(n·s) / ref_tokens²``) for the token-count-invariant policy."""
    var = score.var(dim=1)
    if invariant:
        n = score.shape[1]
        if n != ref_tokens:  # keep n == ref_tokens bit-identical to the reference rule
            var = var * (n / ref_tokens) ** 2
    return var


def prune_indices(score: Tensor, keep: int, num_prefix: int) -> Tensor:
    """[B, P + keep] positions to keep: the prefix, then the ``keep`` best patch tokens in descending score."""
    order = score.topk(keep, dim=1, largest=True, sorted=True).indices
    return with_prefix(order, num_prefix)


def _graph_capture() -> bool:
    """True under torch.export / ONNX export or torch.compile: no reading tensor values into Python."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def pooled_fraction(trace: Trace) -> dict[int, float]:
    """Fraction of images that pooled at each reducing block of the last forward (empty if PPT did not run)."""
    notes = trace.notes.get("ppt_policy", {})
    return {layer: float(v.float().mean()) for layer, v in sorted(notes.items())}


def _check_r(r: Any, blocks_given: Sequence[int]) -> dict[int, int]:
    r_at = per_block(r, blocks_given, "ppt r")
    bad = [v for v in r_at.values() if not is_whole(v) or v < 0]
    if bad:
        raise ValueError(f"ppt: r must be an int >= 0 (tokens removed per block), got {bad}")
    return {b: int(v) for b, v in r_at.items()}


@register_method("ppt")
@dataclass
class PPT(TokenReducer):
    """``vitprune.patch(model, "ppt", r=50, blocks=(3, 6, 9), threshold=7e-5, policy="adaptive")``.

    r: tokens removed at each block (int, or one int per block in ``blocks`` order); ``r=0`` is the identity.
    threshold: τ of the pool/prune decision (≥ 0; ``inf`` pools everything, 0 prunes everything).
    policy: ``"adaptive"`` (reference), ``"adaptive_invariant"`` (token-count invariant, see the module
    docstring), ``"prune"`` or ``"pool"``. ref_tokens: patch count at which the invariant rule equals the reference.
    """

    r: int | Sequence[int] = 50
    blocks: Sequence[int] = (3, 6, 9)
    threshold: float = 7e-5
    policy: str = "adaptive"
    ref_tokens: int = 196
    prop_attn: bool = True

    def setup(self, info: ModelInfo) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"ppt: unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"ppt: threshold must be a number >= 0 (reference: 7e-5), got {t!r}")
        rt = self.ref_tokens
        if isinstance(rt, bool) or not isinstance(rt, int) or rt <= 0:
            raise ValueError(
                f"ppt: ref_tokens must be a positive int (patch tokens the threshold was tuned for), got {rt!r}"
            )
        r_at = _check_r(self.r, check_blocks(self.blocks, info.depth, "ppt"))
        self.has_cls = info.has_cls  # without CLS (SigLIP): the attention each token receives, times ‖v‖
        self._r_at = r_at

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        r = self._r_at.get(layer, 0)
        if r <= 0:
            return state
        p = state.num_prefix
        r = clamp_r(r, state.num_tokens, p)
        if r <= 0:
            return state
        b = state.x.shape[0]

        if self.policy == "pool":
            pooled = torch.ones(b, dtype=torch.bool, device=state.x.device)
            n_pool = b
        else:
            score = importance(scores, p, self.has_cls)
            if self.policy == "prune":
                pooled = torch.zeros(b, dtype=torch.bool, device=state.x.device)
                n_pool = 0
            else:
                stat = policy_statistic(score, self.policy == "adaptive_invariant", self.ref_tokens)
                pooled = stat < self.threshold
                trace.note("ppt_var", layer, stat)
                # Skipping the branch no image takes reads this batch's data in Python; an exported or compiled
                # graph must fit any input, so there both branches run (n_pool = -1: unknown) and where_tokens picks.
                n_pool = -1 if _graph_capture() else int(pooled.sum())
        trace.note("ppt_policy", layer, pooled)

        pool_state = prune_state = None
        if n_pool != 0:
            plan = match_tokens(scores.mean_keys, r, p)
            pool_state = state if plan is None else merge_wavg(state, plan)
        if n_pool != b:
            prune_state = gather_tokens(state, prune_indices(score, state.num_patches - r, p))
        if prune_state is None:
            return pool_state
        if pool_state is None:
            return prune_state
        return where_tokens(pooled, pool_state, prune_state)

    def describe(self) -> str:
        blocks = ",".join(str(b) for b in self.blocks)
        text = f"r={self.r}@{blocks}"
        if self.policy == "adaptive":
            return f"{text} τ={self.threshold:g}"
        if self.policy == "adaptive_invariant":
            return f"{text} τ={self.threshold:g} invariant@{self.ref_tokens}"
        return f"{text} {self.policy}"
