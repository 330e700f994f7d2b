"""ViT-ToGo — grouped token pruning with head-wise importance (Lee et al., DATE'24; no public code).

``vitprune.patch(model, "togo", keep=0.7, blocks=(3, 6, 9), group=2, head_weights="attention")``

Built from the description in DESIGN.md §2; every choice the description leaves open is stated here.

**Where.** At each block in ``blocks``, between the attention residual and the MLP (like EViT/PPT), so the
pruning block's MLP already runs on the kept tokens. CLS / distillation / register tokens are never pruned.

**Groups.** The patch grid (rows R, cols C) is tiled by g×g windows (``group=g``, default 2). A patch token
belongs to the group of its *original* grid position ``p = index − num_prefix``:
``group(p) = (p // C // g) · ⌈C/g⌉ + (p % C) // g``. Groups are kept or pruned whole, so the groups that remain
are always complete, and a later pruning block simply groups what remains by original position again.
``group=1`` is per-token pruning and gives the same result as top-k pruning with the same importance.

**Importance.** With ``A_h[j]`` the softmax attention of the CLS token to token j in head h (size bias
included), token importance is ``s_j = Σ_h w_h · A_h[j]`` with head weights w (per image, Σ_h w_h = 1) from a
head-importance estimator:

* ``"attention"`` (training-free, default): CLS-attention *concentration* of each head over the patch tokens,
  ``c_h = 1 − H(p_h) / log n`` with ``p_h = A_h[patches] / Σ A_h[patches]`` and H the entropy, n the patch
  tokens present; ``w_h = c_h / Σ_h c_h``. A head that spreads its CLS attention evenly carries no ranking
  information (it only adds noise to the ranking), a focused head does.
* ``"learned"``: :class:`HeadImportance`, one tiny module per pruning block:
  ``w = softmax_h(log c_h + MLP(f_h) + b_h)``, ``f_h = (c_h, patch mass Σ_j A_h[j], max_j p_h[j])``,
  MLP = Linear(3, 16) → GELU → Linear(16, 1) shared over heads, b a per-head bias. The last layer and b start
  at zero, so an untrained estimator equals ``"attention"`` exactly.
* ``"uniform"``: ``w_h = 1/H`` (EViT's mean over heads), for ablations.

**Group score.** ``S_G = mean_{j∈G} s_j`` (``group_score="max"``: ``max_{j∈G} s_j``), computed for all images
at once with a scatter over a precomputed position → group-id map (no loops over images or groups).

**How many.** At a pruning block with n patch tokens (n_G groups) and keep ratio κ, the top
``k = round(κ · n_G)`` groups are kept (round half up, at least one group), i.e. ``k · g²`` tokens. Grids not
divisible by g have smaller edge groups (g×r, r×g, r×r with r = R mod g or C mod g). To keep every group
whole *and* the token count the same for every image (static shapes), groups are ranked within their shape
class and each class keeps ``round(κ · n_class)`` of its groups: the kept count is the same for every image and
every stage is planned before the forward (:meth:`ToGo.token_schedule`). With a divisible grid there is one
class and this is plain top-k over groups.

**Order.** Kept tokens stay in their original order (a stable compaction by cumsum, no sort of tokens).

**Pruned tokens.** Dropped (``package=False``, ToGo). With ``package=True`` they are packed into one package
token appended after the kept tokens: ``x_pkg = Σ_j s_j x_j / Σ_j s_j`` over the pruned tokens,
``size = Σ size_j``, ``index = PACKAGE_INDEX`` (no grid position). At a later pruning block the package token
is never grouped with patches: it joins that block's pruned tokens and is re-packed with them (weighted by its
own importance), so there is at most one package token.

**Schedule.** ``keep``: a float for every block or one per block, each in (0, 1] (1.0 = identity), relative to
the patch tokens entering that block. Or ``target_macs``: a *fraction* of the unpatched model's MACs in (0, 1],
turned into one keep ratio for all blocks: the largest κ whose planned token counts give MACs ≤ target by the
DESIGN.md §3 formula (bisection; blocks, patch embedding and head, from ModelInfo). An unreachable target is a
ValueError.

**Training.** Top-k is discrete; the learned estimator gets gradients through a straight-through factor on
the kept tokens: ``x_t ← x_t · (1 + S_G(t) − stopgrad(S_G(t)))`` (exactly 1 in the forward pass, so outputs are
unchanged, and ``∂L/∂S_G = Σ_{t∈G} ⟨∂L/∂x_t, x_t⟩``), plus, with ``package=True``, the package weights.
The factor is applied only while autograd is recording and the estimator is learned. The estimator's
parameters live in ``ToGo.module`` (an ``nn.Module``), which ``vitprune.patch`` registers in the model as
``model.vitprune_method`` (so ``model.parameters()``/``state_dict()`` include them) and ``unpatch`` removes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionScores
from ..measure.flops import paper_vit_macs
from ..registry import register_method
from ..tokens import PACKAGE_INDEX, TokenState, append_token, gather_tokens, with_prefix
from .base import ModelInfo, TokenReducer, Trace, check_blocks, check_keep, per_block
from .evit import topk_and_fuse

HEAD_WEIGHTS = ("attention", "learned", "uniform")
GROUP_SCORES = ("mean", "max")
NUM_HEAD_FEATURES = 3
_EPS = 1e-6


# ---------------------------------------------------------------- head importance


def head_features(attn_patches: Tensor) -> Tensor:
    """Per-head features of the CLS attention over the patch tokens present.

    ``attn_patches``: [B, H, n] CLS attention (float). Returns [B, H, 3]: concentration
    ``1 − H(p)/log n``, patch mass ``Σ_j A[j]`` and peak share ``max_j p[j]`` with ``p = A / Σ A``.
    """
    n = attn_patches.shape[-1]
    mass = attn_patches.sum(-1)
    p = attn_patches / mass.unsqueeze(-1).clamp_min(1e-12)
    if n > 1:
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        concentration = (1.0 - entropy / math.log(n)).clamp(0.0, 1.0)
    else:
        concentration = torch.ones_like(mass)
    return torch.stack([concentration, mass, p.amax(-1)], dim=-1)


def attention_head_weights(attn_patches: Tensor) -> Tensor:
    """Training-free head weights [B, H]: CLS-attention concentration, normalised over heads."""
    c = head_features(attn_patches)[..., 0] + _EPS
    return c / c.sum(-1, keepdim=True)


class HeadImportance(nn.Module):
    """Learned head weights for one pruning block: ``softmax_h(log c_h + MLP(f_h) + b_h)``.

    Starts equal to the training-free ``"attention"`` weights (last layer and ``head_bias`` are zero).
    """

    def __init__(self, num_heads: int, hidden: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(NUM_HEAD_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.head_bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, attn_patches: Tensor) -> Tensor:
        feats = head_features(attn_patches)  # [B, H, F]
        dtype = self.head_bias.dtype
        logits = (feats[..., 0] + _EPS).log().to(dtype) + self.mlp(feats.to(dtype)).squeeze(-1) + self.head_bias
        return logits.float().softmax(dim=-1)


class ToGoHeadImportance(nn.Module):
    """The learned estimators of all pruning blocks (what ``vitprune.patch`` registers in the model)."""

    def __init__(self, num_heads: int, blocks: Sequence[int], hidden: int = 16) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.per_block = nn.ModuleDict({str(b): HeadImportance(num_heads, hidden) for b in blocks})

    def forward(self, layer: int, attn_patches: Tensor) -> Tensor:
        return self.per_block[str(layer)](attn_patches)


# ---------------------------------------------------------------- groups and the static plan


@dataclass(frozen=True)
class GroupLayout:
    """g×g windows over a (rows, cols) patch grid; groups of each shape form one class."""

    grid: tuple[int, int]
    group: int
    group_of: Tensor  # [R·C] long: group id of each grid position
    group_class: Tensor  # [G] long: shape class of each group
    group_tokens: Tensor  # [G] float: patch tokens in each group
    class_tokens: tuple[int, ...]  # tokens per group, per class
    class_groups: tuple[int, ...]  # groups per class on the full grid
    class_start: Tensor  # [K] long: first position of each class when groups are sorted by class

    @property
    def num_groups(self) -> int:
        return int(self.group_class.numel())


def group_layout(grid: tuple[int, int], group: int) -> GroupLayout:
    rows, cols = grid
    g = group
    gr, gc = -(-rows // g), -(-cols // g)
    r = torch.arange(rows).view(-1, 1).expand(rows, cols)
    c = torch.arange(cols).view(1, -1).expand(rows, cols)
    group_of = ((r // g) * gc + c // g).reshape(-1)
    gh = torch.tensor([min(g, rows - i * g) for i in range(gr)]).view(-1, 1).expand(gr, gc)
    gw = torch.tensor([min(g, cols - j * g) for j in range(gc)]).view(1, -1).expand(gr, gc)
    shapes = sorted({(int(h), int(w)) for h, w in zip(gh.reshape(-1), gw.reshape(-1))}, key=lambda s: -s[0] * s[1])
    class_id = {s: i for i, s in enumerate(shapes)}
    group_class = torch.tensor([class_id[(int(h), int(w))] for h, w in zip(gh.reshape(-1), gw.reshape(-1))])
    class_groups = tuple(int((group_class == i).sum()) for i in range(len(shapes)))
    starts = [0]
    for n in class_groups[:-1]:
        starts.append(starts[-1] + n)
    return GroupLayout(
        grid=(rows, cols),
        group=g,
        group_of=group_of,
        group_class=group_class,
        group_tokens=(gh * gw).reshape(-1).float(),
        class_tokens=tuple(h * w for h, w in shapes),
        class_groups=class_groups,
        class_start=torch.tensor(starts),
    )


@dataclass(frozen=True)
class Stage:
    """What one pruning block does (the same for every image): patch tokens before/after, groups kept per class."""

    tokens_in: int  # grid (patch) tokens entering the block, package excluded
    tokens_kept: int
    quotas: tuple[int, ...]  # groups kept per shape class
    tail_in: int  # package tokens entering (0 or 1)
    tail_out: int


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_stages(
    layout: GroupLayout, keep_at: dict[int, float], package: bool
) -> dict[int, Stage]:
    """Simulate the schedule on the group counts: the token counts of every pruning block, before any forward."""
    present = list(layout.class_groups)
    tail = 0
    stages = {}
    for layer in sorted(keep_at):
        keep = keep_at[layer]
        quotas = [min(n, round_half_up(keep * n)) for n in present]
        if sum(quotas) == 0:  # keep at least one group (of the largest shape that is left)
            first = next(i for i, n in enumerate(present) if n > 0)
            quotas[first] = 1
        tokens_in = sum(n * t for n, t in zip(present, layout.class_tokens))
        kept = sum(q * t for q, t in zip(quotas, layout.class_tokens))
        tail_out = tail if kept == tokens_in else int(package)
        stages[layer] = Stage(tokens_in, kept, tuple(quotas), tail, tail_out)
        present, tail = quotas, tail_out
    return stages


def compact(mask: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` True entries of each row of ``mask`` [B, n], in order (a cumsum, no sort)."""
    b, n = mask.shape
    dest = torch.where(mask, mask.cumsum(1) - 1, count)
    positions = torch.arange(n, device=mask.device).expand(b, n)
    out = torch.zeros(b, count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(1, dest, positions)[:, :count]


# ---------------------------------------------------------------- the method


@register_method("togo")
@dataclass
class ToGo(TokenReducer):
    """Grouped token pruning; see the module docstring for every formula and choice."""

    keep: float | Sequence[float] | None = None  # default 0.7 when target_macs is not given
    blocks: Sequence[int] = (3, 6, 9)
    group: int = 2
    head_weights: str = "attention"
    group_score: str = "mean"
    package: bool = False
    target_macs: float | None = None  # fraction of the unpatched model's MACs, in (0, 1]
    prop_attn: bool = False  # log(size) attention bias; only matters for the package token (package=True)
    module: ToGoHeadImportance | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._layouts: dict[tuple[int, int], GroupLayout] = {}
        self._plans: dict[tuple[int, int], dict[int, Stage]] = {}
        self._device_layouts: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self.keep_at: dict[int, float] = {}

    # ---- configuration

    def setup(self, info: ModelInfo) -> None:
        self.has_cls = info.has_cls  # without CLS (SigLIP): the attention each token receives
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"togo group must be an integer >= 1 (g×g windows, 1 = per-token), got {self.group!r}")
        if self.group > min(info.grid):
            raise ValueError(
                f"togo group={self.group} is larger than the {info.grid[0]}x{info.grid[1]} patch grid; "
                f"use group <= {min(info.grid)}"
            )
        if self.head_weights not in HEAD_WEIGHTS:
            raise ValueError(f"togo head_weights must be one of {', '.join(HEAD_WEIGHTS)}, got {self.head_weights!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"togo group_score must be one of {', '.join(GROUP_SCORES)}, got {self.group_score!r}")
        given = check_blocks(self.blocks, info.depth, "togo")
        blocks = tuple(sorted(given))
        if self.target_macs is not None:
            if self.keep is not None:
                raise ValueError("togo takes either keep= or target_macs=, not both")
            keep_at = self._solve_target(info, blocks)
        else:
            keeps = per_block(0.7 if self.keep is None else self.keep, given, "togo keep")
            keep_at = {b: check_keep(k, "togo keep") for b, k in keeps.items()}
        # all validated: commit
        self.blocks = blocks
        self.keep_at = keep_at
        self._layouts, self._plans, self._device_layouts = {}, {}, {}
        # the model's own grid is planned now, in plain Python: a first forward under torch.compile then finds it
        # (planning reads tensor values, a data-dependent graph break, and fullgraph=True would fail on it)
        self.plan(info.grid)
        if self.head_weights == "learned":
            reuse = (
                self.module is not None
                and self.module.num_heads == info.num_heads
                and set(self.module.per_block) == {str(b) for b in blocks}
            )
            if not reuse:
                self.module = ToGoHeadImportance(info.num_heads, blocks)
        else:
            self.module = None

    def _solve_target(self, info: ModelInfo, blocks: tuple[int, ...]) -> dict[int, float]:
        t = self.target_macs
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ValueError(
                f"togo target_macs is a fraction of the unpatched model's MACs in (0, 1], got {t!r} (e.g. 0.64)"
            )
        full = self.planned_macs(info, {b: 1.0 for b in blocks})
        target = float(t) * full

        def fits(keep: float) -> bool:
            return self.planned_macs(info, {b: keep for b in blocks}) <= target

        if fits(1.0):
            return {b: 1.0 for b in blocks}
        lo, hi = 1e-9, 1.0
        if not fits(lo):
            least = self.planned_macs(info, {b: lo for b in blocks}) / full
            raise ValueError(
                f"togo target_macs={t} is unreachable with blocks {blocks} and group={self.group}: pruning all but "
                f"one group per block still costs {least:.3f} of the unpatched MACs; prune at earlier blocks or "
                f"raise the target"
            )
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return {b: lo for b in blocks}

    # ---- the static plan

    def layout(self, grid: tuple[int, int]) -> GroupLayout:
        grid = tuple(grid)
        if grid not in self._layouts:
            if self.group > min(grid):
                raise ValueError(f"togo group={self.group} is larger than the {grid[0]}x{grid[1]} patch grid")
            self._layouts[grid] = group_layout(grid, self.group)
        return self._layouts[grid]

    def plan(self, grid: tuple[int, int], keep_at: dict[int, float] | None = None) -> dict[int, Stage]:
        if keep_at is not None:
            return plan_stages(self.layout(grid), keep_at, self.package)
        grid = tuple(grid)
        if grid not in self._plans:
            self._plans[grid] = plan_stages(self.layout(grid), self.keep_at, self.package)
        return self._plans[grid]

    def token_schedule(
        self, info: ModelInfo, keep_at: dict[int, float] | None = None, grid: tuple[int, int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Tokens entering each block's attention and MLP (what ``Trace.tokens_attn/tokens_mlp`` will show)."""
        grid = tuple(grid or info.grid)
        stages = self.plan(grid, keep_at)
        n = info.num_prefix + grid[0] * grid[1]
        attn, mlp = [], []
        for layer in range(info.depth):
            attn.append(n)
            stage = stages.get(layer)
            if stage is not None:
                n = info.num_prefix + stage.tokens_kept + stage.tail_out
            mlp.append(n)
        return attn, mlp

    def planned_macs(self, info: ModelInfo, keep_at: dict[int, float] | None = None) -> float:
        """MACs per image by the DESIGN.md §3 formula for the planned token counts."""
        attn, mlp = self.token_schedule(info, keep_at)
        return float(paper_vit_macs(attn, mlp, info.dim, info.patch_embed_macs, info.head_macs, info.mlp_ratio))

    # ---- the forward

    def _head_weights(self, layer: int, attn_patches: Tensor) -> Tensor:
        if self.head_weights == "uniform":
            h = attn_patches.shape[1]
            return attn_patches.new_full((attn_patches.shape[0], h), 1.0 / h)
        if self.head_weights == "learned":
            return self.module(layer, attn_patches)
        return attention_head_weights(attn_patches)

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        if layer not in self.keep_at:
            return state
        if state.grid is None or state.index is None:
            raise ValueError("togo needs the patch grid and token positions (TokenState.grid/index) from the backend")
        stage = self.plan(state.grid)[layer]
        if stage.tokens_kept == stage.tokens_in:
            return state
        p = state.num_prefix
        if state.num_tokens != p + stage.tokens_in + stage.tail_in:
            raise RuntimeError(
                f"togo planned {stage.tokens_in} patch tokens (+{stage.tail_in} package) at block {layer} but got "
                f"{state.num_patches}; another reduction (patch dropout?) changed the tokens"
            )
        attn = scores.token_attn(self.has_cls).float()  # [B, H, N]
        w = self._head_weights(layer, attn[:, :, p : p + stage.tokens_in])  # [B, H]
        importance = torch.einsum("bh,bhn->bn", w, attn)  # [B, N]
        trace.note("togo_head_weights", layer, w.detach().mean(0))
        trace.note("togo_kept", layer, stage.tokens_kept)
        return self._prune(state, importance, stage)

    def _device_layout(self, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        key = (tuple(grid), device)
        if key not in self._device_layouts:
            lay = self.layout(grid)
            self._device_layouts[key] = tuple(t.to(device) for t in (lay.group_of, lay.group_class, lay.class_start))
        return self._device_layouts[key]

    def _group_scores(self, state: TokenState, importance: Tensor, stage: Stage) -> tuple[Tensor, Tensor]:
        """([B, n] group id of each patch token, [B, G] group score; −inf for groups no longer present)."""
        p, n = state.num_prefix, stage.tokens_in
        group_of, _, _ = self._device_layout(state.grid, importance.device)
        gid = group_of[state.index[:, p : p + n] - p]  # [B, n]
        imp = importance[:, p : p + n]
        b, g = imp.shape[0], self.layout(state.grid).num_groups
        neg_inf = torch.full((b, g), -math.inf, device=imp.device, dtype=imp.dtype)
        reduce = "amax" if self.group_score == "max" else "mean"
        if reduce == "mean" and torch.compiler.is_exporting():
            # ONNX has no scatter-mean (the exporter silently turns it into a plain scatter): sum / count instead
            total = torch.zeros_like(neg_inf).scatter_add(1, gid, imp)
            count = torch.zeros_like(neg_inf).scatter_add(1, gid, torch.ones_like(imp))
            return gid, torch.where(count > 0, total / count.clamp_min(1.0), neg_inf)
        return gid, neg_inf.scatter_reduce(1, gid, imp, reduce=reduce, include_self=False)

    def _select_groups(self, score: Tensor, stage: Stage, grid: tuple[int, int]) -> Tensor:
        """[B, G] bool: the top groups of each shape class (stage.quotas of them)."""
        b, g = score.shape
        selected = torch.zeros(b, g, dtype=torch.bool, device=score.device)
        if len(stage.quotas) == 1:
            top = score.topk(stage.quotas[0], dim=1, sorted=False).indices
            return selected.scatter_(1, top, True)
        _, group_class, class_start = self._device_layout(grid, score.device)
        order = score.argsort(dim=1, descending=True, stable=True)  # by score ...
        order = order.gather(1, group_class[order].argsort(dim=1, stable=True))  # ... within class
        cls = group_class[order]
        rank = torch.arange(g, device=score.device) - class_start[cls]
        quotas = torch.tensor(stage.quotas, device=score.device)
        return selected.scatter_(1, order, rank < quotas[cls])

    def _prune(self, state: TokenState, importance: Tensor, stage: Stage) -> TokenState:
        p, n, k = state.num_prefix, stage.tokens_in, stage.tokens_kept
        gid, score = self._group_scores(state, importance, stage)
        keep_mask = self._select_groups(score.detach(), stage, state.grid).gather(1, gid)  # [B, n]
        kept_idx = compact(keep_mask, k)
        kept = gather_tokens(state, with_prefix(kept_idx, p))
        if self.module is not None and torch.is_grad_enabled() and score.requires_grad:
            s = score.gather(1, gid.gather(1, kept_idx))  # group score of each kept token
            factor = (1.0 + (s - s.detach())).unsqueeze(-1).to(kept.x.dtype)
            kept = kept.with_x(torch.cat([kept.x[:, :p], kept.x[:, p:] * factor], dim=1))
        if not self.package:
            return kept
        # everything that is not kept goes into the package: the pruned patches and an earlier package token
        pruned = torch.cat([
            keep_mask.new_zeros(keep_mask.shape[0], p), ~keep_mask,
            keep_mask.new_ones(keep_mask.shape[0], state.num_tokens - p - n),
        ], dim=1)
        return append_token(kept, *self._package(state, importance, pruned))

    @staticmethod
    def _package(state: TokenState, importance: Tensor, pruned: Tensor) -> tuple:
        """One token per image from the tokens where ``pruned`` [B, N] is True: Σ s_j x_j / Σ s_j (a batched
        mat-vec over all tokens with zero weight on the others, no gather), size Σ size_j, index PACKAGE_INDEX."""
        w = importance * pruned
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        x_pkg = torch.bmm(w.unsqueeze(1).to(state.x.dtype), state.x).squeeze(1)
        size = (state.sizes().squeeze(-1) * pruned).sum(1)
        source = None
        if state.source is not None:
            source = (state.source * pruned.unsqueeze(-1).to(state.source.dtype)).amax(1)
        index = torch.full_like(state.index[:, 0], PACKAGE_INDEX)
        return x_pkg, size, source, index

    def describe(self) -> str:
        keep = ",".join(f"{self.keep_at[b]:.3g}" for b in self.blocks) if self.keep_at else str(self.keep)
        blocks = ",".join(str(b) for b in self.blocks)
        extra = "+pkg" if self.package else ""
        return f"keep={keep}@{blocks} g={self.group} {self.head_weights}{extra}"


@dataclass
class ToGoPerTokenTopK(ToGo):
    """Per-token top-k with ToGo's importance and token counts (EViT's ``topk_and_fuse`` without fusing).

    Not registered: the baseline for the 1×1-group equivalence test and for the selection-overhead benchmark
    (``vitprune.patch(model, ToGoPerTokenTopK(keep=0.7, group=2))`` keeps exactly as many tokens as ToGo).
    Kept tokens come in descending importance; positions are not used, so it does not group.
    """

    def setup(self, info: ModelInfo) -> None:
        if self.package:
            raise ValueError("ToGoPerTokenTopK drops pruned tokens; package=True is not supported")
        super().setup(info)

    def _prune(self, state: TokenState, importance: Tensor, stage: Stage) -> TokenState:
        return topk_and_fuse(state, importance, stage.tokens_kept, fuse=False)
