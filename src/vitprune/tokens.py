"""The token state that flows between blocks, and the primitives every method reduces it with.

A method never edits tensors in place: it returns a new :class:`TokenState` built with :func:`gather_tokens`,
:func:`merge_tokens` or :func:`append_token`, so sizes, sources and positions stay consistent for free.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

# ``index`` of a package token (a fused token that holds pruned patches, EViT/HeatViT/SPViT style): it stands at no
# grid position, so grid-aware methods and pictures can tell it from patch tokens.
PACKAGE_INDEX = -1

# A closure that maps a per-token tensor [B, N, ...] to the reduced layout [B, N', ...]. ``mode`` is how tokens
# that land on the same output are combined ("sum", "amax", "mean").
MergeFn = Callable[[Tensor, str], Tensor]


@dataclass
class TokenState:
    """Tokens between blocks.

    x:      [B, N, C] hidden states; the first ``num_prefix`` tokens (CLS, distillation, registers) are never reduced.
    size:   [B, N, 1] how many input tokens each token stands for; ``None`` means all ones (nothing reduced yet).
    source: [B, N, N0] 0/1 map from tokens to the input tokens they hold (only when tracing, for pictures).
    index:  [B, N] the input position each token came from (its own, or the one it was merged into);
            ``PACKAGE_INDEX`` for package tokens.
    grid:   (rows, cols) of the input patch grid, so grid-aware methods can map positions back to 2-D.
    keep:   [B, N] soft/hard keep mask while a learned selector trains (masked attention, static shapes);
            ``None`` at inference, where dropped tokens are gathered away instead.
    pos:    [B, N, 2D] rotary positions for RoPE models: ``[sin | cos]`` of each rotary angle, as the model's own
            rope table gives them (prefix tokens: sin 0, cos 1, no rotation); ``None`` for other models.
            See :func:`merge_tokens` for what a merged token's position is.
    """

    x: Tensor
    num_prefix: int
    size: Tensor | None = None
    source: Tensor | None = None
    index: Tensor | None = None
    grid: tuple[int, int] | None = None
    keep: Tensor | None = None
    pos: Tensor | None = None

    @classmethod
    def initial(
        cls, x: Tensor, num_prefix: int, grid: tuple[int, int] | None = None, trace_source: bool = False,
        pos: Tensor | None = None,
    ) -> "TokenState":
        b, n, _ = x.shape
        index = torch.arange(n, device=x.device).unsqueeze(0).expand(b, n)
        source = None
        if trace_source:
            source = torch.eye(n, device=x.device, dtype=x.dtype).unsqueeze(0).expand(b, n, n)
        return cls(x=x, num_prefix=num_prefix, index=index, source=source, grid=grid, pos=pos)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def num_patches(self) -> int:
        """Tokens that reduction may touch (everything after the prefix)."""
        return self.x.shape[1] - self.num_prefix

    def sizes(self) -> Tensor:
        """``size`` materialised: [B, N, 1] ones when nothing was reduced yet."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1)

    def with_x(self, x: Tensor) -> "TokenState":
        return replace(self, x=x)


def gather_tokens(state: TokenState, idx: Tensor) -> TokenState:
    """Keep the tokens at ``idx`` ([B, K] positions into the current tokens, prefix included), in that order."""
    b, n = state.x.shape[:2]
    # one index_select over the flattened batch: several times faster on CPU than gather with an expanded index
    flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * n).reshape(-1)

    def take(t: Tensor) -> Tensor:
        return t.reshape(b * n, *t.shape[2:]).index_select(0, flat).view(b, idx.shape[1], *t.shape[2:])

    return replace(
        state,
        x=take(state.x),
        size=None if state.size is None else take(state.size),
        source=None if state.source is None else take(state.source),
        index=None if state.index is None else state.index.gather(1, idx),
        keep=None if state.keep is None else state.keep.gather(1, idx),
        pos=None if state.pos is None else take(state.pos),
    )


def merge_tokens(state: TokenState, merge: MergeFn, layout: MergeFn) -> TokenState:
    """Apply a merge closure with size-weighted averaging (ToMe's ``merge_wavg``).

    ``merge`` combines tokens; ``layout`` moves per-token attributes without combining them (each output keeps
    the value of its destination token), which is what grid indices need.

    Rotary positions (``pos``) are size-weighted means of the ``(sin, cos)`` pairs: a merged token's rotation is the
    *circular mean* of the angles of every patch it holds (the backend normalises each pair back to unit length when
    it rotates q and k). It is a sum over the held patches, so it does not depend on the order of the tokens, on which
    token was the destination, or on the order the merges happened in; tokens at one position keep that position
    exactly; and for nearby patches (small angle differences) it is their centroid's angle. The destination's
    position would instead depend on ToMe's alternating split, and moves a merged region to one of its ends.
    """
    size = state.sizes()
    x = merge(state.x * size, "sum")
    new_size = merge(size, "sum")
    return replace(
        state,
        x=x / new_size,
        size=new_size,
        source=None if state.source is None else merge(state.source, "amax"),
        index=None if state.index is None else layout(state.index.unsqueeze(-1), "keep").squeeze(-1),
        keep=None if state.keep is None else merge(state.keep.unsqueeze(-1), "amax").squeeze(-1),
        pos=None if state.pos is None else merge(state.pos * size, "sum") / new_size,
    )


def append_token(state: TokenState, x: Tensor, size: Tensor, source: Tensor | None, index: Tensor) -> TokenState:
    """Append one token per image (a fused / package token): x [B, C], size [B], source [B, N0], index [B].

    A package holds patches from all over the image, so like its index (``PACKAGE_INDEX``) its rotary position is
    none: sin 0, cos 1, the identity rotation that prefix tokens get.
    """
    return replace(
        state,
        x=torch.cat([state.x, x.unsqueeze(1)], dim=1),
        size=torch.cat([state.sizes(), size.view(-1, 1, 1).to(state.x.dtype)], dim=1),
        source=None if state.source is None else torch.cat([state.source, source.unsqueeze(1)], dim=1),
        index=None if state.index is None else torch.cat([state.index, index.view(-1, 1)], dim=1),
        keep=None if state.keep is None else torch.cat([state.keep, state.keep.new_ones(state.keep.shape[0], 1)], 1),
        pos=None if state.pos is None else torch.cat([state.pos, no_rotation(state.pos[:, :1])], dim=1),
    )


def no_rotation(like: Tensor) -> Tensor:
    """``[sin | cos]`` rows of the identity rotation, shaped like ``like`` ([..., 2D])."""
    half = like.shape[-1] // 2
    return torch.cat([like.new_zeros(*like.shape[:-1], half), like.new_ones(*like.shape[:-1], half)], dim=-1)


def where_tokens(cond: Tensor, a: TokenState, b: TokenState) -> TokenState:
    """Per image: state ``a`` where ``cond`` [B] is True, else ``b`` (two reductions to the same token count)."""

    def pick(ta: Tensor | None, tb: Tensor | None) -> Tensor | None:
        if ta is None:
            return None
        return torch.where(cond.view(-1, *([1] * (ta.dim() - 1))), ta, tb)

    return replace(
        a,
        x=pick(a.x, b.x),
        size=pick(a.sizes(), b.sizes()),
        source=pick(a.source, b.source),
        index=pick(a.index, b.index),
        keep=pick(a.keep, b.keep),
        pos=pick(a.pos, b.pos),
    )


def with_prefix(idx: Tensor, num_prefix: int) -> Tensor:
    """Turn [B, K] indices into the patch tokens into [B, P + K] indices into all tokens (prefix first)."""
    b = idx.shape[0]
    prefix = torch.arange(num_prefix, device=idx.device).unsqueeze(0).expand(b, num_prefix)
    return torch.cat([prefix, idx + num_prefix], dim=1)


# ---- back onto the patch grid ------------------------------------------------------------------------------------
# Dense heads, hierarchical models (PiT's pooling, Swin's windows and patch merging) and timm's feature API need one
# feature per patch position. The rule, shared by all of them:
#   * a kept patch token goes back to its own position;
#   * a merged token goes back to *every* patch it holds (ToMe's "unmerge": its source map);
#   * a pruned patch gets the package / fused token that holds it (``fill="package"``), or zeros (``fill="zeros"``,
#     or where no package holds it, e.g. PPT's pruning, EViT with ``fuse=False``).
# ``covered`` says, per position, how much of the value came from a token (1) rather than the zero fill (0), so a
# caller can put something else there (e.g. the patch's features from the block where it was dropped).
GRID_FILLS = ("package", "zeros")


def grid_holders(state: TokenState, owner: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(patch, package): [B, HW] ordinals into ``state``'s tokens of the patch token and of the package token that
    hold each grid position, −1 where none.

    With a source map (``trace_source=True``) both come from it, so merged tokens hold all their patches. Without
    one, each patch token holds only its own position (``index``), which is exact only if nothing was merged, and
    packages come from ``owner`` ([B, HW] ordinal among the package tokens, read where no patch token holds the
    position, or holds it with keep < 1; hierarchical backends record it as they prune), else the first package.
    """
    if state.grid is None or state.index is None:
        raise ValueError("restoring the grid needs a TokenState with a grid and indices (TokenState.initial sets both)")
    b, n = state.x.shape[:2]
    p, hw = state.num_prefix, state.grid[0] * state.grid[1]
    is_pkg = state.index == PACKAGE_INDEX
    none = torch.full((b, hw), -1, dtype=torch.long, device=state.x.device)
    if state.source is not None:
        held = state.source[:, :, p:p + hw] > 0.5  # [B, N, HW]

        def holder(tokens: Tensor) -> Tensor:
            h = held & tokens.unsqueeze(-1)
            return torch.where(h.any(1), h.to(torch.uint8).argmax(1), none)

        return holder(~is_pkg & (state.index >= p)), holder(is_pkg)
    size = state.sizes()[..., 0]
    if bool(((size > 1) & ~is_pkg & (state.index >= p)).any()):
        raise ValueError(
            "merged tokens hold several patches and only a source map says which: patch the model with "
            "trace_source=True (vitprune.patch(model, method, trace_source=True)) to restore the grid"
        )
    slot = torch.where(is_pkg | (state.index < p), hw, state.index - p)  # prefix and packages → spare slot hw
    ordinal = torch.arange(n, device=state.x.device).expand(b, n)
    patch = torch.cat([none, none[:, :1]], 1).scatter(1, slot, ordinal)[:, :hw]
    package = none
    if bool(is_pkg.any()):  # packages are the last tokens; without a record, the first one holds every position
        first_pkg = is_pkg.to(torch.uint8).argmax(1, keepdim=True)
        package = first_pkg.expand(b, hw) if owner is None else owner + first_pkg
    return patch, package


def restore_grid(state: TokenState, fill: str = "package", owner: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tokens → (grid [B, C, H, W], covered [B, H, W]); see the rule above and :func:`grid_holders`.

    With a reduction that did nothing this is the identity on the patch tokens. While a selector trains, tokens
    are not removed but masked (``keep``, soft and straight-through): a position gets ``keep · token +
    (1 − keep) · package``, so the refill stays differentiable in the decisions and shapes stay static.
    """
    if fill not in GRID_FILLS:
        raise ValueError(f"fill must be one of {GRID_FILLS}, got {fill!r}")
    b, _, c = state.x.shape
    h, w = state.grid
    patch, package = grid_holders(state, owner)
    weight = state.keep.to(state.x.dtype) if state.keep is not None else state.x.new_ones(state.x.shape[:2])

    def take(holder: Tensor) -> tuple[Tensor, Tensor]:
        found = holder >= 0
        idx = holder.clamp_min(0)
        values = state.x.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
        return values, torch.where(found, weight.gather(1, idx), torch.zeros_like(weight[:, :1]))

    grid, covered = take(patch)
    grid = grid * covered.unsqueeze(-1)
    if fill == "package":
        values, found = take(package)
        share = (found > 0).to(grid.dtype) * (1.0 - covered)
        grid = grid + share.unsqueeze(-1) * values
        covered = covered + share
    return grid.transpose(1, 2).reshape(b, c, h, w), covered.view(b, h, w)
