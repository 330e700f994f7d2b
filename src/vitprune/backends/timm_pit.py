"""timm PiT backend: a thin class swap of ``PoolingVisionTransformer`` (pit_ti/xs/s/b_224, distilled too).

PiT is a ViT in stages; between stages a depthwise conv pools the patch tokens *as a 2-D grid*. Each stage's
blocks (timm's pre-norm ``Block``) run through the shared engine with :class:`~vitprune.backends.timm.TimmBlockOps`,
so all attention goes through :func:`vitprune.attention.attend`. Methods see one block numbering across stages
(pit_s: stage 0 = blocks 0–1, stage 1 = 2–7, stage 2 = 8–11) and a :class:`StagedModelInfo` that describes each
stage (width, heads, grid); keep rates are fractions of the *stage's* patch tokens.

Before each pooling layer the tokens go back on the grid (:func:`restore_grid`): kept tokens to their positions
(``TokenState.index``), every pruned position filled with the package token that holds it, package tokens dropped
from the sequence; the next stage starts from a fresh full-grid state and its selectors prune again.

Only methods that understand stages (``supports_stages``: the learned selectors ``spvit``/``heatvit``) run here:
a training-free method (ToMe merges, EViT/PPT/ToGo) would need its own restore rule (ToMe: un-merging), which
this backend does not have — it raises instead of silently mis-running. Parameters are never touched, so
``unpatch`` gives back the original model exactly.
"""
from __future__ import annotations

import sys

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attention import AttentionScores
from ..engine import PatchContext, run_blocks
from ..methods.base import ModelInfo, TokenReducer, Trace
from ..tokens import PACKAGE_INDEX, TokenState
from ..tokens import restore_grid as restore_tokens_to_grid
from ..registry import register_backend
from .swap import no_intermediates, swap_in, swap_out
from .timm import TimmBlockOps

try:
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.pit import PoolingVisionTransformer
    from timm.models.vision_transformer import Block as TimmBlock
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's PiT backend needs timm >= 1.0: pip install 'timm>=1.0'") from e


@dataclass(frozen=True)
class StagedModelInfo(ModelInfo):
    """ModelInfo of a hierarchical model: the top-level fields describe stage 0 (where tokens enter) and the
    whole depth; ``stages`` holds one ModelInfo per stage (its own depth, width, heads, grid)."""

    stages: tuple[ModelInfo, ...] = ()


def is_timm_pit(model: nn.Module) -> bool:
    return isinstance(model, PoolingVisionTransformer)


def check_supported(model: nn.Module) -> None:
    problems = []
    for s, stage in enumerate(model.transformers):
        for i, block in enumerate(stage.blocks):
            if type(block) is not TimmBlock or type(block.attn) is not TimmAttention:
                problems.append(f"stage {s} block {i} is {type(block).__name__} (only timm's pre-norm Block is "
                                "supported)")
                break
    if problems:
        raise ValueError(f"cannot patch {type(model).__name__}: " + "; ".join(problems)
                         + ". Use a timm PiT (e.g. timm.create_model('pit_s_224')).")


def check_method(model: nn.Module, method: TokenReducer) -> None:
    """Only methods that read ``info.stages`` can run across PiT's pooling layers."""
    if not getattr(method, "supports_stages", False):
        raise ValueError(
            f"method {method.name!r} cannot run on {type(model).__name__} (PiT): its pooling layers need the tokens "
            "back on the full grid, which vitprune does for the learned selectors only; use 'spvit' or 'heatvit' "
            "(e.g. vitprune.patch(model, 'spvit', keep=(0.7, 0.5, 0.7), blocks=(3, 6, 9))), or a plain ViT/DeiT "
            "for ToMe/EViT/PPT/ToGo"
        )


def _stage_grids(model: nn.Module) -> list[tuple[int, int]]:
    h, w = model.patch_embed.grid_size
    grids = []
    for stage in model.transformers:
        if stage.pool is not None:
            conv = stage.pool.conv
            k, st, pd = conv.kernel_size[0], conv.stride[0], conv.padding[0]
            h, w = (h + 2 * pd - k) // st + 1, (w + 2 * pd - k) // st + 1
        grids.append((h, w))
    return grids


def model_info(model: nn.Module) -> StagedModelInfo:
    num_prefix = model.cls_token.shape[1]
    stages = []
    for stage, grid in zip(model.transformers, _stage_grids(model)):
        block = stage.blocks[0]
        dim = block.norm1.normalized_shape[0]
        stages.append(ModelInfo(depth=len(stage.blocks), dim=dim, num_heads=block.attn.num_heads,
                                num_prefix=num_prefix, grid=grid, mlp_ratio=block.mlp.fc1.out_features / dim))
    conv = model.patch_embed.conv
    first = stages[0]
    return StagedModelInfo(
        depth=sum(s.depth for s in stages), dim=first.dim, num_heads=first.num_heads, num_prefix=num_prefix,
        grid=first.grid, mlp_ratio=first.mlp_ratio, has_cls=True,
        patch_embed_macs=first.num_patches * conv.weight[0].numel() * conv.out_channels,
        head_macs=model.head.weight.numel() if isinstance(model.head, nn.Linear) else 0,
        stages=tuple(stages),
    )


class _Stage(TokenReducer):
    """The method seen from one stage: global block numbers, and a record of which package token holds each
    pruned grid position (so the grid can be refilled before pooling)."""

    def __init__(self, method: TokenReducer, first: int, num_prefix: int, num_patches: int) -> None:
        self.method, self.first = method, first
        self.prop_attn = method.prop_attn
        self.num_prefix, self.num_patches = num_prefix, num_patches
        self.owner: Tensor | None = None  # [B, HW] ordinal of the package token holding a pruned position

    def before_attention(self, layer: int, state: TokenState, trace: Trace) -> TokenState:
        new = self.method.before_attention(self.first + layer, state, trace)
        if new is not state:
            self._record(state, new)
        return new

    def reduce(self, layer: int, state: TokenState, scores: AttentionScores, trace: Trace) -> TokenState:
        new = self.method.reduce(self.first + layer, state, scores, trace)
        if new is not state:
            self._record(state, new)
        return new

    def _present(self, state: TokenState) -> Tensor:
        """[B, HW] bool: grid positions held by a kept patch token."""
        pos, w = _patch_slots(state)
        hit = torch.zeros(pos.shape[0], self.num_patches + 1, dtype=torch.bool, device=pos.device)
        return hit.scatter_(1, pos, w.detach() > 0.5)[:, :-1]

    def _record(self, before: TokenState, after: TokenState) -> None:
        is_pkg = after.index == PACKAGE_INDEX
        n_pkg = int(is_pkg[0].sum())
        if n_pkg == 0:
            return
        gone = self._present(before) & ~self._present(after)
        if self.owner is None:
            self.owner = torch.zeros_like(gone, dtype=torch.long)
        self.owner = self.owner.masked_fill(gone, n_pkg - 1)  # the newest package (appended or updated) is last


def _patch_slots(state: TokenState) -> tuple[Tensor, Tensor]:
    """Grid position of every token ([B, N], prefix and package tokens sent to a spare slot HW) and its weight
    (the keep mask, 1 where there is none)."""
    p = state.num_prefix
    pos = state.index - p
    n = int(state.grid[0] * state.grid[1])
    pos = torch.where((state.index >= p), pos, torch.full_like(pos, n))
    w = state.keep if state.keep is not None else state.x.new_ones(state.x.shape[:2])
    return pos, w


def restore_grid(state: TokenState, owner: Tensor | None) -> tuple[Tensor, Tensor]:
    """Tokens → (prefix [B, P, C], grid [B, C, H, W]) for the pooling conv (:func:`vitprune.tokens.restore_grid`).

    Kept tokens go back to their positions; a pruned position gets the package token that holds it (zero when the
    method keeps no package): the package is the keep-probability-weighted mean of exactly the tokens it replaced,
    so it is the best single-vector estimate of them and what the stage's later blocks attended to in their place.
    Zeros would read, to the 3×3 pooling conv, like image border padding, and a residual-stream activation is far
    from zero (large mean components): a hole of zeros shifts the pooled features much more.
    """
    grid, _ = restore_tokens_to_grid(state, "package", owner)
    return state.x[:, :state.num_prefix], grid


class PatchedPoolingVisionTransformer:
    """Mixin placed in front of the model's own class; see module docstring."""

    _vitprune: PatchContext

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty [B, C, H, W] image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.patch_embed.conv.in_channels:
            raise ValueError(f"model expects {self.patch_embed.conv.in_channels} input channel(s), got {x.shape[1]}")
        ctx = self._vitprune
        x = self.patch_embed(x)
        if tuple(x.shape[-2:]) != tuple(self.pos_embed.shape[-2:]):
            h, w = self.patch_embed.img_size
            raise ValueError(f"image size does not match the model's {h}x{w}; resize the images to {h}x{w}")
        x = self.pos_drop(x + self.pos_embed)
        cls_token = self.cls_token if torch.is_grad_enabled() else self.cls_token.detach()
        # (under no_grad a view of a parameter still says requires_grad, which trips torch's module tracker in
        # FlopCounterMode once it enters the pooling module; detaching is a no-op for the values)
        prefix = cls_token.expand(x.shape[0], -1, -1)
        p = prefix.shape[1]
        trace, first, last = Trace(), 0, len(self.transformers) - 1
        for s, stage in enumerate(self.transformers):
            if stage.pool is not None:
                x, prefix = stage.pool(x, prefix)
            b, c, h, w = x.shape
            tokens = stage.norm(torch.cat([prefix, x.flatten(2).transpose(1, 2)], dim=1))
            state = TokenState.initial(tokens, p, grid=(h, w), trace_source=ctx.trace_source)
            view = _Stage(ctx.method, first, p, h * w)
            state = run_blocks(stage.blocks, TimmBlockOps, state, view, trace)
            first += len(stage.blocks)
            if s < last:  # the last stage's patch tokens are never used (PiT classifies from the CLS token)
                prefix, x = restore_grid(state, view.owner)
            else:
                prefix = state.x[:, :p]
        ctx.finish(state, trace)
        return self.norm(prefix)

    forward_intermediates = no_intermediates


def apply(model: nn.Module, ctx: PatchContext) -> None:
    swap_in(model, ctx, PatchedPoolingVisionTransformer)


def restore(model: nn.Module) -> None:
    swap_out(model)


register_backend("timm_pit", is_timm_pit, sys.modules[__name__])
