"""Learned multi-head token selectors (SPViT, Kong et al. ECCV'22; HeatViT, Dong et al. HPCA'23).

Before a chosen block, a small selector scores every patch token as keep/drop. The selector (SPViT's, per head):

* split the channels into the H attention heads; per head: LayerNorm → Linear → GELU, then half of the channels
  stay *local* (the token's own) and half become *global* (their mean over the tokens still kept);
  [local, global] → Linear(d/2) → GELU → Linear(d/4) → GELU → Linear(2) → per-head log-probabilities (keep, drop);
* head weights: each head's channel mean → Linear(H, H/2) → GELU → Linear(H/2, H) → sigmoid;
* score = head-weighted mean of the per-head log-probabilities (and, for the package weights, of the probabilities).
  As in the official code, one MLP is shared by the heads (its list holds the same module H times).

Training (``module.training``): hard 0/1 keep decisions with a straight-through gradient, multiplied across
stages; nothing is gathered — the decisions become ``TokenState.keep`` and attention masks dropped keys
(``attention.masked_softmax``), so shapes stay static and gradients reach the selector through the mask. How the
decisions are drawn (``decisions``):

* ``"topk"`` (the default for ``mode="fixed"``): exactly the tokens fixed-count inference keeps — the top
  ``round(keep_i · N)`` by score — so training sees the token budget it will run at. A first version trained with
  Gumbel samples and a ratio loss; the CE gradient held the sampled keep rates far above their targets (0.79/0.68/
  0.47 against 0.5/0.25/0.125 on the testbed) and fixed-count inference then pruned much harder than trained for.
* ``"gumbel"`` (DynamicViT/SPViT; the default for ``mode="adaptive"`` and what the latency loss needs): Gumbel-softmax
  samples, so the keep *rates* are learned (pulled to targets by the ratio or latency-sparsity loss).

Dropped tokens are not thrown away: they are *packed* into a package token, the average of the tokens dropped at
this stage weighted by their keep probability. HeatViT keeps one package token and adds each stage's package to
it; SPViT appends a package token per stage. Package tokens are always kept and carry ``PACKAGE_INDEX``.

Inference (eval mode) gathers the kept tokens. ``mode="fixed"``: the top ``round(keep_i · N)`` patch tokens by
score (``keep_i`` is the cumulative fraction of the original patch tokens still present after stage i), the same
count for every image — static shapes, batch-friendly, exportable. ``mode="adaptive"``: each image keeps the
tokens whose keep probability is ≥ ``threshold`` (HeatViT's rule); a batch is padded to its largest count and the
padding is masked out of attention (see ``benchmarks/selector_adaptive.py`` for padded vs per-image timing).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokens import PACKAGE_INDEX, TokenState, append_token, gather_tokens, with_prefix
from .base import ModelInfo, TokenReducer, Trace, check_blocks, check_keep, per_block

PACK_EPS = 1e-6
MODES = ("fixed", "adaptive")
DECISIONS = ("topk", "gumbel")
PACKAGES = ("update", "append", "none")


class MultiHeadSelector(nn.Module):
    """SPViT's multi-head token selector: [B, N, C] tokens (+ [B, N] mask of tokens still kept) → scores."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"selector: width {dim} is not divisible by {num_heads} heads")
        d = dim // num_heads
        if d < 8 or num_heads < 2:
            raise ValueError(f"selector needs ≥ 2 heads of ≥ 8 channels, got {num_heads} heads of {d}")
        self.num_heads = num_heads
        self.in_conv = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(), nn.Linear(d // 4, 2)
        )
        self.head_weights = nn.Sequential(
            nn.Linear(num_heads, max(1, num_heads // 2)), nn.GELU(), nn.Linear(max(1, num_heads // 2), num_heads),
            nn.Sigmoid(),
        )

    def fits(self, dim: int, num_heads: int) -> bool:
        return self.num_heads == num_heads and self.in_conv[1].in_features * num_heads == dim

    def forward(self, x: Tensor, kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (log-probs [B, N, 2], probs [B, N, 2]), column 0 = keep, each a head-weighted mean."""
        b, n, c = x.shape
        h = self.num_heads
        xh = x.reshape(b, n, h, c // h)
        w = self.head_weights(xh.mean(dim=-1))  # [B, N, H]
        z = self.in_conv(xh)  # [B, N, H, d]
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if kept is None:
            g = glob.mean(dim=1, keepdim=True)
        else:
            m = kept.to(z.dtype)[:, :, None, None]
            g = (glob * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(PACK_EPS)
        logits = self.out_conv(torch.cat([local, g.expand_as(glob)], dim=-1))  # [B, N, H, 2]
        w = w.unsqueeze(-1)
        norm = w.sum(dim=2)
        log_probs = (F.log_softmax(logits.float(), dim=-1) * w).sum(dim=2) / norm
        probs = (F.softmax(logits.float(), dim=-1) * w).sum(dim=2) / norm
        return log_probs.to(x.dtype), probs.to(x.dtype)


def block_stages(info: ModelInfo) -> dict[int, ModelInfo]:
    """Block → the ModelInfo of its stage: ``info.stages`` (one per stage, in order, each with its own ``depth``)
    on hierarchical models, else ``info`` for every block."""
    stages = getattr(info, "stages", None) or (info,)
    at, first = {}, 0
    for stage in stages:
        at.update({first + i: stage for i in range(stage.depth)})
        first += stage.depth
    if first != info.depth:
        raise ValueError(f"model info: stages hold {first} blocks but depth is {info.depth}")
    return at


def structure(info: ModelInfo) -> tuple[tuple[int, int, int], ...]:
    """(depth, width, heads) of each stage: recognises a model family whatever its image size."""
    return tuple((s.depth, s.dim, s.num_heads) for s in (getattr(info, "stages", None) or (info,)))


# (keep, blocks) used when neither is given, for models recognised by their structure. Swin-T/S: SPViT's Swin budgets
# (4.50 → 3.47 and 8.70 → 6.35 GMACs); selectors at three blocks of the long third stage and at the last block, keep
# (ρ, ρ², ρ³, ρ) with ρ the largest that fits the budget in MACs counted from the executed ops (Swin-T 3.469,
# Swin-S 6.331 GMACs at 224; `benchmarks/speed_swin.py --find` re-derives them, tests/test_swin.py checks them).
STRUCTURE_DEFAULTS: dict[tuple[tuple[int, int, int], ...], tuple[tuple[float, ...], tuple[int, ...]]] = {
    ((2, 96, 3), (2, 192, 6), (6, 384, 12), (2, 768, 24)): ((0.635, 0.403, 0.256, 0.635), (5, 7, 9, 11)),
    ((2, 96, 3), (2, 192, 6), (18, 384, 12), (2, 768, 24)): ((0.701, 0.491, 0.344, 0.701), (8, 13, 17, 23)),
}


def selector_macs(n: int, dim: int, num_heads: int) -> int:
    """MACs of one selector on ``n`` tokens (DESIGN §3 gives ≈ 5/8·N·C² + N·C/2 for the per-head MLP form)."""
    d = dim // num_heads
    per_head = d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2
    return n * (num_heads * per_head + num_heads * max(1, num_heads // 2) * 2)


def gumbel_keep(log_probs: Tensor, tau: float = 1.0) -> Tensor:
    """Hard 0/1 keep decisions [B, N] with the straight-through gradient of the soft sample."""
    return F.gumbel_softmax(log_probs.float(), tau=tau, hard=True)[..., 0].to(log_probs.dtype)


def topk_keep(keep_prob: Tensor, prev: Tensor, k: int) -> Tensor:
    """Hard 0/1 keep decisions [B, N]: the ``k`` tokens of highest keep probability among those still kept
    (``prev`` > 0), with its straight-through gradient. Ranked by the probability itself, as fixed-count inference
    ranks: the head-weighted mean of log-probabilities orders tokens differently when the heads disagree."""
    score = keep_prob.float().masked_fill(prev <= 0, float("-inf"))
    hard = torch.zeros_like(score).scatter_(1, score.topk(k, dim=1).indices, 1.0)
    soft = keep_prob.float()
    return (hard + (soft - soft.detach())).to(keep_prob.dtype)  # value exactly 0/1


def package(x: Tensor, weight: Tensor) -> Tensor:
    """[B, N, C] tokens, [B, N] weights (zero for tokens not packed) → [B, C] weighted average (zero if none)."""
    w = weight.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / (w.sum(dim=1) + PACK_EPS)


@dataclass
class TokenSelector(TokenReducer):
    """Shared by ``heatvit`` and ``spvit``; see the module docstring. Subclasses set the defaults."""

    keep: float | Sequence[float] = (0.7, 0.49, 0.343)
    blocks: Sequence[int] | None = None
    mode: str = "fixed"
    threshold: float = 0.5
    package: str = "update"
    tau: float = 1.0
    decisions: str | None = None  # training: "topk" (default for mode=fixed) or "gumbel" (default for adaptive)
    checkpoint: str | None = None  # a selectors-only folder written by `vitprune train` (see train/checkpoint.py)
    prop_attn: bool = False
    module: nn.ModuleDict | None = field(default=None, init=False, repr=False, compare=False)

    default_blocks_12: ClassVar[tuple[int, ...]] = (3, 6, 9)  # selector positions for a 12-block model
    supports_stages: ClassVar[bool] = True  # reads ``info.stages``, so hierarchical backends (PiT) accept it

    def setup(self, info: ModelInfo) -> None:
        default = STRUCTURE_DEFAULTS.get(structure(info))
        if default is not None and self.blocks is None and self.keep == type(self).keep:  # neither given
            self.keep, self.blocks = default
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {self.mode!r}")
        if self.package not in PACKAGES:
            raise ValueError(f"{self.name}: package must be one of {PACKAGES}, got {self.package!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"{self.name}: threshold is a keep probability in (0, 1), got {self.threshold!r}")
        if self.decisions is not None and self.decisions not in DECISIONS:
            raise ValueError(f"{self.name}: decisions must be one of {DECISIONS}, got {self.decisions!r}")
        if self.decisions == "topk" and self.mode != "fixed":
            raise ValueError(f"{self.name}: decisions=topk trains fixed counts; mode={self.mode!r} needs gumbel")
        if not float(self.tau) > 0.0:
            raise ValueError(f"{self.name}: Gumbel temperature tau must be > 0, got {self.tau!r}")
        blocks = self.blocks
        if blocks is None:  # the papers' positions for 12 blocks, scaled to this depth
            blocks = sorted({min(info.depth - 1, round(b * info.depth / 12)) for b in self.default_blocks_12})
        paired = per_block(self.keep, check_blocks(blocks, info.depth, self.name), f"{self.name} keep")
        if 0 in paired:
            raise ValueError(f"{self.name}: a selector needs at least one block before it; use blocks ≥ 1")
        self.blocks = tuple(paired)
        keeps = tuple(check_keep(k) for k in paired.values())
        # hierarchical models (PiT) describe each stage with its own ModelInfo (``info.stages``; blocks numbered
        # across stages); a pooling layer restores the full grid, so keep rates restart and must not increase only
        # within a stage, and each selector gets its stage's width and heads
        at = block_stages(info)
        for a, b, ka, kb in zip(self.blocks, self.blocks[1:], keeps, keeps[1:]):
            if kb > ka and at[a] is at[b]:
                raise ValueError(
                    f"{self.name}: keep {keeps} must not increase: each value is the fraction of the original patch "
                    "tokens still present after that selector (decisions multiply across stages)"
                )
        self.keep = keeps
        self.keep_at = dict(zip(self.blocks, keeps))
        self.stage_of = {b: i for i, b in enumerate(self.blocks)}
        # selectors before each one in the same model stage: how many packages it finds (a pooling stage drops them)
        self.earlier_at = {b: sum(1 for a in self.blocks if a < b and at[a] is at[b]) for b in self.blocks}
        self.num_patches = info.num_patches
        self.patches_at = {b: at[b].num_patches for b in self.blocks}
        self.num_prefix = info.num_prefix
        wanted = {str(b) for b in self.blocks}
        if not (self.module is not None and set(self.module.keys()) == wanted
                and all(self.module[str(b)].fits(at[b].dim, at[b].num_heads) for b in self.blocks)):
            self.module = nn.ModuleDict({str(b): MultiHeadSelector(at[b].dim, at[b].num_heads) for b in self.blocks})
        if self.checkpoint is not None:
            from ..train.checkpoint import load_method_weights

            load_method_weights(self.module, self.checkpoint)

    # ---- the engine hook -------------------------------------------------------------------------------------
    def before_attention(self, layer: int, state: TokenState, trace: Trace) -> TokenState:
        if layer not in self.keep_at:
            return state
        selector = self.module[str(layer)]
        if selector.training:
            return self._select_masked(layer, selector, state, trace)
        return self._select_gather(layer, selector, state, trace)

    def _split(self, layer: int, state: TokenState) -> tuple[int, int]:
        """(first, end) positions of the candidate patch tokens: after the prefix, before the package tokens."""
        return state.num_prefix, state.num_tokens - self._packages_before(layer, state)

    def _packages_before(self, layer: int, state: TokenState) -> int:
        """Package tokens at the end of ``state`` when the selector at ``layer`` runs.

        Every stage attaches one (training, and fixed-count inference), so the schedule gives the count without
        reading the data: fixed-count inference then has no host sync and compiles to one graph (torch.compile,
        export). Adaptive inference skips the package of a stage where no image dropped a token, so there the
        token indices say.
        """
        if self.mode == "adaptive" and not self.module[str(layer)].training:
            return 0 if state.index is None else int((state.index[0] == PACKAGE_INDEX).sum())
        if self.package == "none":
            return 0
        earlier = self.earlier_at[layer]
        return earlier if self.package == "append" else min(earlier, 1)

    def _count(self, layer: int, n: int, count: int | None = None) -> int:
        """Tokens a fixed-count selector keeps of ``n`` candidates: ``count``, else the schedule's
        ``round(keep_i · patches)``; at least 1."""
        k = count if count is not None else round(self.keep_at[layer] * self.patches_at[layer])
        return max(1, min(n, k))

    def _select_masked(self, layer: int, selector: MultiHeadSelector, state: TokenState, trace: Trace) -> TokenState:
        """Training: hard decisions (top-k or Gumbel, see the module docstring) as a key mask; no token moves."""
        p, e = self._split(layer, state)
        x = state.x[:, p:e]
        keep = state.keep if state.keep is not None else state.x.new_ones(state.x.shape[:2])
        prev = keep[:, p:e]
        log_probs, probs = selector(x, prev)
        if self.train_decisions == "topk":
            hard = topk_keep(probs[..., 0], prev, self._count(layer, e - p)) * prev
        else:
            hard = gumbel_keep(log_probs, self.tau) * prev
        dropped = prev - hard  # dropped at this stage
        keep = torch.cat([keep[:, :p], hard, keep[:, e:]], dim=1)
        trace.note("selector_keep", layer, hard)  # [B, n] over the original patch tokens, with gradient
        trace.note("selector_prob", layer, probs[..., 0] * prev)
        state = replace(state, keep=keep)
        packed = self._package_value(layer, state, x, probs[..., 0] * dropped, dropped)
        return self._attach_package(layer, state, packed)

    def _select_gather(self, layer: int, selector: MultiHeadSelector, state: TokenState, trace: Trace,
                       count: int | None = None) -> TokenState:
        """Inference: gather kept tokens (fixed count — ``count`` overrides the schedule's — or per image by
        threshold with padding)."""
        p, e = self._split(layer, state)
        x = state.x[:, p:e]
        prev = None if state.keep is None else state.keep[:, p:e]
        _, probs = selector(x, prev)
        score = probs[..., 0]
        if prev is not None:
            score = score.masked_fill(prev <= 0, -1.0)  # padding never comes back
        n = e - p
        if self.mode == "fixed":
            k = self._count(layer, n, count)
            order = score.argsort(dim=1, descending=True)
            kept_mask = None
        else:
            take = score >= self.threshold
            counts = take.sum(dim=1)
            k = max(1, int(counts.max()))
            order = score.argsort(dim=1, descending=True)
            kept_mask = (torch.arange(k, device=x.device).unsqueeze(0) < counts.clamp_min(1).unsqueeze(1))
            trace.note("selector_kept", layer, counts.clamp_min(1).detach())
        kept_idx, drop_idx = order[:, :k], order[:, k:]
        if self.mode == "fixed":
            trace.note("selector_kept", layer, torch.full_like(score[:, 0], k, dtype=torch.long))
        # weights of the dropped tokens in the package: their keep probability (0 for padding / not dropped)
        drop_w = torch.zeros_like(score)
        if drop_idx.shape[1]:
            drop_w.scatter_(1, drop_idx, score.gather(1, drop_idx).clamp_min(0.0))
        if kept_mask is not None:  # adaptive: kept slots past an image's count are dropped too
            late = kept_idx.masked_fill(kept_mask, 0)
            w_late = score.gather(1, late).clamp_min(0.0) * (~kept_mask)
            drop_w = drop_w.scatter_add(1, late, w_late)
        dropped = (drop_w > 0).to(x.dtype)
        packed = self._package_value(layer, state, x, drop_w, dropped)
        if packed is not None and kept_mask is not None and not bool((packed[1] > 0).any()):
            packed = None  # adaptive: no image dropped anything, so no empty package token
        rest = state.num_tokens - e
        idx = torch.cat([with_prefix(kept_idx, p),
                         torch.arange(e, state.num_tokens, device=x.device).expand(x.shape[0], rest)], dim=1)
        new = gather_tokens(state, idx)
        if kept_mask is not None:
            ones_p = kept_mask.new_ones(x.shape[0], p)
            ones_r = kept_mask.new_ones(x.shape[0], rest)
            keep = torch.cat([ones_p, kept_mask, ones_r], dim=1).to(x.dtype)
            if new.keep is not None:
                keep = keep * new.keep
            new = replace(new, keep=keep)
        return self._attach_package(layer, new, packed)

    # ---- packaging ---------------------------------------------------------------------------------------------
    def _package_value(self, layer: int, state: TokenState, x: Tensor, weight: Tensor, dropped: Tensor):
        if self.package == "none":
            return None
        p, e = self._split(layer, state)
        src = None
        if state.source is not None:
            src = (state.source[:, p:e] * dropped.unsqueeze(-1)).amax(dim=1)
        size = (state.sizes()[:, p:e, 0] * dropped).sum(dim=1)
        return package(x, weight), size, src

    def _attach_package(self, layer: int, state: TokenState, packed) -> TokenState:
        if packed is None:
            return state
        value, size, src = packed
        has_package = self._packages_before(layer, state) > 0
        # with a keep mask (training, adaptive padding), an image's package stays masked until it holds something,
        # so an image that dropped nothing computes exactly as if it ran alone
        holds = (size > 0).to(state.x.dtype).detach()
        if self.package == "update" and has_package:  # HeatViT: one package token, this stage's package added
            sizes = state.sizes()
            held = (sizes[:, -1] > 0).to(state.x.dtype)  # [B, 1]: an empty package starts afresh
            x = torch.cat([state.x[:, :-1], (state.x[:, -1] * held + value).unsqueeze(1)], dim=1)
            sizes = torch.cat([sizes[:, :-1], sizes[:, -1:] + size.view(-1, 1, 1).to(sizes.dtype)], dim=1)
            source = state.source
            if source is not None:
                source = torch.cat([source[:, :-1], torch.maximum(source[:, -1:], src.unsqueeze(1))], dim=1)
            keep = state.keep
            if keep is not None:
                keep = torch.cat([keep[:, :-1], torch.maximum(keep[:, -1:], holds.unsqueeze(1))], dim=1)
            return replace(state, x=x, size=sizes, source=source, keep=keep)
        index = torch.full_like(value[:, 0], PACKAGE_INDEX, dtype=torch.long)
        state = append_token(state, value, size, src, index)
        if state.keep is not None:
            state = replace(state, keep=torch.cat([state.keep[:, :-1], holds.unsqueeze(1)], dim=1))
        return state

    # ---- reporting ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        blocks = ",".join(str(b) for b in self.blocks or ())
        keep = self.keep if isinstance(self.keep, (int, float)) else "/".join(f"{k:g}" for k in self.keep)
        extra = f",{self.mode}" if self.mode != "fixed" else ""
        return f"keep={keep}@{blocks}{extra}"

    @property
    def train_decisions(self) -> str:
        """How training draws decisions: the configured ``decisions``, else top-k for fixed counts, else Gumbel."""
        return self.decisions or ("topk" if self.mode == "fixed" else "gumbel")

    @property
    def static_shapes(self) -> bool:
        return self.mode == "fixed"

    def target_keep(self) -> dict[int, float]:
        """Stage → target fraction of the original patch tokens kept (the ratio loss's ρ_i)."""
        return dict(self.keep_at)


class SelectionStep(nn.Module):
    """One selector stage as fixed-count inference runs it — score, top-k, gather, package token — on [B, n, C]
    tokens (prefix included), keeping ``keep`` of the patch tokens. ``vitprune lut`` times this per token count, so
    the latency table holds the whole cost of a selection rather than the selector's MLP alone (timing only the MLP
    left the LUT ≈ 10% optimistic for trained selectors on the testbed)."""

    def __init__(self, method: TokenSelector, info: ModelInfo, keep: float = 0.5) -> None:
        super().__init__()
        method.setup(info)
        self.method, self.keep, self.layer = method, float(keep), method.blocks[0]
        self.selector = method.module[str(self.layer)]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] <= self.method.num_prefix:
            return x  # no patch token left to choose from
        state = TokenState.initial(x, self.method.num_prefix)
        k = round(self.keep * (x.shape[1] - self.method.num_prefix))
        return self.method._select_gather(self.layer, self.selector, state, Trace(), count=k).x


def expected_tokens(keep_at: dict[int, float], depth: int, num_patches: int, num_prefix: int,
                    packages: str = "update") -> list[float]:
    """Tokens entering each block under fixed-count inference (for MACs planning and the latency LUT)."""
    tokens, n, n_pack = [], float(num_patches), 0
    for layer in range(depth):
        if layer in keep_at:
            n = max(1, round(keep_at[layer] * num_patches))
            if packages == "append" or (packages == "update" and n_pack == 0):
                n_pack += 1
        tokens.append(num_prefix + n + n_pack)
    return tokens

