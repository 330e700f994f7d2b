"""Full-grid features from a patched model: timm's ``forward_intermediates`` for dense tasks.

Segmentation and detection heads, SAM-style necks and ``features_only`` models need one feature per patch position,
but a patched model has fewer tokens after each reduction. The engine hands every block's output to a
:class:`GridCollector`, which puts the tokens back on the patch grid with the shared rule of
:func:`vitprune.tokens.restore_grid` (a merged token on every patch it holds, a kept token on its own), and fills
the positions that no patch token holds any more, as ``fill`` says:

* ``"similar"`` (default): the current features of the surviving token it was most similar to when it was dropped
  (ToMe's matching, applied at restore time: a pruned patch is unmerged as if it had been merged into that token);
* ``"last"``: the patch's own features from the last block where a token still held it ("early exit");
* ``"package"``: the package / fused token that holds it (EViT, SPViT, HeatViT, ToGo with a package), zeros where
  none does (PPT's pruning, EViT with ``fuse=False``);
* ``"zeros"``: zeros.

``"similar"`` is the default because its features are the closest to the unpatched model's on real images, in
cosine and in a dense task (see the dense-fidelity table in ``docs/dense.md``, ``benchmarks/dense_fidelity.py``):
``"last"`` features come from an earlier block, a different space from the last block's; a package is one vector
standing for up to hundreds of patches from all over the image.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import TokenState, restore_grid

INTERMEDIATE_FILLS = ("similar", "last", "package", "zeros")
OUTPUT_FORMATS = ("NCHW", "NLC")

# (images, number of blocks to run, after-block hook) → final TokenState, run with the source map traced
RunBlocks = Callable[[Tensor, int, Callable[[int, TokenState], None]], TokenState]


class GridCollector:
    """The engine's ``after_block`` hook: keeps the full-grid features (and prefix tokens) of the blocks in ``take``."""

    def __init__(self, take: Sequence[int], fill: str, norm: nn.Module | None = None) -> None:
        if fill not in INTERMEDIATE_FILLS:
            raise ValueError(f"fill must be one of {INTERMEDIATE_FILLS}, got {fill!r}")
        self.take, self.fill, self.norm = set(take), fill, norm
        self.grids: dict[int, Tensor] = {}  # [B, C, H, W]
        self.prefix: dict[int, Tensor] = {}  # [B, P, C]
        self._last: Tensor | None = None  # [B, C, H, W], every position's latest features ("last", "similar")
        self._link: Tensor | None = None  # [B, HW] the held position each position takes its features from

    def _follow_links(self, grid: Tensor, covered: Tensor) -> Tensor:
        """fill="similar": each position no token holds takes the current features of a held position — the one
        whose features were most similar (cosine) to its own in the last block where it was held, found once when
        it is dropped and found again only if that position is dropped too. This is ToMe's matching applied at
        restore time: a pruned patch is treated as if it had been merged into its most similar surviving token."""
        b, c = grid.shape[:2]
        held = covered.flatten(1) > 0.5  # [B, HW]
        prev = F.normalize(self._last.flatten(2).transpose(1, 2), dim=-1)  # [B, HW, C]
        own = torch.arange(held.shape[1], device=grid.device).expand_as(held)
        link = own if self._link is None else self._link
        stale = ~held & ~held.gather(1, link)
        if bool(stale.any()):
            sim = (prev @ prev.transpose(1, 2)).masked_fill(~held.unsqueeze(1), float("-inf"))
            link = torch.where(stale, sim.argmax(-1), link)
        self._link = torch.where(held, own, link)
        flat = grid.flatten(2).transpose(1, 2)
        return flat.gather(1, self._link.unsqueeze(-1).expand(-1, -1, c)).transpose(1, 2).reshape(grid.shape)

    def __call__(self, layer: int, state: TokenState) -> None:
        if layer not in self.take and self.fill not in ("last", "similar"):  # these two follow every block
            return
        grid, covered = restore_grid(state, "zeros" if self.fill in ("last", "similar") else self.fill)
        if self.fill == "last" and self._last is not None:
            # positions no token holds keep the features they had when they were dropped
            grid = grid + (1.0 - covered).unsqueeze(1) * self._last
        elif self.fill == "similar" and self._last is not None:
            grid = grid + (1.0 - covered).unsqueeze(1) * self._follow_links(grid, covered)
        if self.fill in ("last", "similar"):
            covered = torch.ones_like(covered)
            self._last = grid
        if layer not in self.take:
            return
        prefix = state.x[:, :state.num_prefix]
        if self.norm is not None:  # per position, like timm's norm=True on tokens; zero-filled positions stay zero
            grid = self.norm(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (covered > 0).unsqueeze(1)
            prefix = self.norm(prefix)
        self.grids[layer], self.prefix[layer] = grid.contiguous(), prefix


def forward_intermediates(
    model: nn.Module,
    run: RunBlocks,
    x: Tensor,
    indices: int | Sequence[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    fill: str = "similar",
) -> Any:
    """timm's ``forward_intermediates`` contract (same arguments, same outputs) on a patched model.

    The intermediates are full-grid; the final features (``x`` of ``(x, intermediates)``) are the reduced tokens, as
    ``forward_features`` returns them, so ``forward_head`` pools them by size as usual.
    """
    from timm.models._features import feature_take_indices

    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    depth = len(model.blocks)
    take, max_index = feature_take_indices(depth, indices)
    collector = GridCollector(take, fill, model.norm if norm else None)
    state = run(x, max_index + 1 if stop_early else depth, collector)
    grids = [collector.grids[i] for i in take]
    prefixes = [collector.prefix[i] for i in take]
    if output_fmt == "NLC":
        grids = [g.flatten(2).transpose(1, 2) for g in grids]
    has_prefix = state.num_prefix > 0
    if output_dict:
        out: dict[str, Any] = {"image_intermediates": grids}
        if has_prefix and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            out["image_features"] = model.norm(state.x)
        return out
    if return_prefix_tokens and has_prefix:
        grids = list(zip(grids, prefixes))
    if intermediates_only:
        return grids
    return model.norm(state.x), grids
