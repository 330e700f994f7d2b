"""timm backend: a thin class swap of ``VisionTransformer`` (and subclasses such as distilled DeiT).

Only the model's class changes: its ``forward_features`` runs the blocks through the shared engine and its
``pool`` weights average pooling by token size. Parameters, buffers and submodules are never touched, so
``unpatch`` (restoring the class) gives back the original model exactly.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from ..attention import EXP_ATTR, MASK_EPS, AttentionScores, attend, size_bias
from .. import features
from ..engine import PatchContext, run_blocks
from ..kernels import fast_path_enabled, gelu_mlp_inplace, linear_into
from ..methods.base import ModelInfo, Trace
from ..tokens import TokenState
from ..registry import register_backend
from .swap import swap_in, swap_out

try:  # timm is a hard dependency, but keep the import error readable
    from timm.layers.attention import Attention as TimmAttention
    from timm.layers.attention_pool import AttentionPoolLatent
    from timm.layers.mlp import Mlp as TimmMlp
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's timm backend needs timm >= 1.0: pip install 'timm>=1.0'") from e

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map", "")


class TimmBlockOps:
    """Runs the parts of a timm ``Block`` (pre-norm, optional LayerScale/DropPath, optional QK-norm and gate)."""

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.norm1(x)

    @staticmethod
    def attention(
        block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        attn = block.attn
        b, n, _ = h.shape
        fast = fast_path_enabled(attn) and type(attn.qkv) is nn.Linear  # a swapped-in layer (e.g. int8) runs itself
        qkv = linear_into(h, attn.qkv, "qkv") if fast else attn.qkv(h)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if attn.training else 0.0
        out, scores = attend(q, k, v, scale=attn.scale, size=size, keep=keep, exp=getattr(attn, EXP_ATTR, None),
                             dropout_p=dropout)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(out)), scores

    @staticmethod
    def attn_residual(block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + block.drop_path1(block.ls1(y))

    @staticmethod
    def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
        mlp = block.mlp
        if fast_path_enabled(block) and _plain_gelu_mlp(mlp):
            return x.add_(block.ls2(gelu_mlp_inplace(mlp.fc1, mlp.act, mlp.fc2, block.norm2(x))))
        return x + block.drop_path2(block.ls2(mlp(block.norm2(x))))


def _plain_gelu_mlp(mlp: nn.Module) -> bool:
    """fc1 → GELU → fc2 with nothing in between (timm's default ViT MLP), so the fused path is exact."""
    return (
        type(mlp) is TimmMlp
        and type(mlp.act) is nn.GELU
        and isinstance(mlp.norm, nn.Identity)
        and type(mlp.fc1) is nn.Linear
        and type(mlp.fc2) is nn.Linear
    )


def is_timm_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def check_supported(model: nn.Module) -> None:
    """Raise one ValueError listing why this timm model cannot be patched (if it cannot)."""
    problems = []
    for i, block in enumerate(model.blocks):
        if type(block) is not TimmBlock:
            problems.append(f"block {i} is {type(block).__name__} (only timm's pre-norm Block is supported)")
            break
        if type(block.attn) is not TimmAttention:
            problems.append(f"block {i} attention is {type(block.attn).__name__} (only timm's Attention is supported)")
            break
    attn_pool = getattr(model, "attn_pool", None)
    if model.global_pool not in SUPPORTED_POOLS or (attn_pool is not None and type(attn_pool) is not AttentionPoolLatent):
        problems.append(f"global_pool={model.global_pool!r} (supported: {', '.join(repr(p) for p in SUPPORTED_POOLS)})")
    if problems:
        raise ValueError(
            f"cannot patch {type(model).__name__}: " + "; ".join(problems)
            + ". Use a standard ViT/DeiT/DINOv2 from timm (e.g. timm.create_model('deit_small_patch16_224'))."
        )


def model_info(model: nn.Module) -> ModelInfo:
    block = model.blocks[0]
    mlp_hidden = block.mlp.fc1.out_features if hasattr(block.mlp, "fc1") else 4 * model.embed_dim
    return ModelInfo(
        depth=len(model.blocks),
        dim=model.embed_dim,
        num_heads=block.attn.num_heads,
        num_prefix=model.num_prefix_tokens,
        grid=tuple(model.patch_embed.grid_size),
        mlp_ratio=mlp_hidden / model.embed_dim,
        has_cls=model.cls_token is not None,
        patch_embed_macs=model.patch_embed.num_patches * model.patch_embed.proj.weight[0].numel() * model.embed_dim,
        head_macs=model.head.weight.numel() if isinstance(model.head, nn.Linear) else 0,
    )


def _check_input(model: nn.Module, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images as a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    in_chans = model.patch_embed.proj.in_channels
    if x.shape[1] != in_chans:
        raise ValueError(f"model expects {in_chans} input channel(s), got {x.shape[1]}; convert the images first")
    pe = model.patch_embed
    strict = getattr(pe, "strict_img_size", True) and not getattr(model, "dynamic_img_size", False)
    if strict and pe.img_size is not None and tuple(x.shape[-2:]) != tuple(pe.img_size):
        h, w = pe.img_size
        raise ValueError(
            f"image size {tuple(x.shape[-2:])} does not match the model's {h}x{w}; resize the images to {h}x{w}, "
            f"or build the model for your size (timm.create_model(..., img_size=...) or dynamic_img_size=True)"
        )


def pool_reduced(
    x: Tensor, pool_type: str, ctx: PatchContext, attn_pool: nn.Module | None, skip: int
) -> Tensor | None:
    """Pool reduced tokens so each counts for the patches it stands for; None: the model's own pooling is exact.

    Average pooling weights tokens by size; an attention-pool head (MAP: SigLIP, some EVA) gets ``log(size)`` as its
    attention mask, as every block does. Masked tokens (selector training, padding) do not count. ``skip``: leading
    tokens left out of the pool (the prefix, unless the model pools it too).
    """
    size, keep = ctx.final_size, ctx.final_keep
    if keep is not None and keep.shape[1] == x.shape[1]:
        size = keep.unsqueeze(-1) if size is None else size * keep.unsqueeze(-1)
    if size is not None and size.shape[1] != x.shape[1]:
        size = None  # features from elsewhere (e.g. a user's own tensor): nothing to weight
    if attn_pool is not None:
        bias = None if size is None else size_bias(size[:, skip:].clamp_min(MASK_EPS), x.dtype)  # masked: 1e-6
        return attn_pool(x[:, skip:], attn_mask=bias)
    if pool_type not in ("avg", "avgmax") or size is None:
        return None
    w = size[:, skip:].to(x.dtype)
    mean = (x[:, skip:] * w).sum(dim=1) / w.sum(dim=1)
    if pool_type == "avg":
        return mean
    return 0.5 * (x[:, skip:].amax(dim=1) + mean)


class PatchedVisionTransformer:
    """Mixin placed in front of the model's own class; see module docstring."""

    _vitprune: PatchContext

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model changes the token count per block, so it cannot take attn_mask/is_causal")
        return self.norm(self._vitprune_run(x).x)

    def _vitprune_run(
        self, x: Tensor, depth: int | None = None, after_block: Callable[[int, TokenState], None] | None = None
    ) -> TokenState:
        """Images → the final TokenState of the first ``depth`` blocks (all by default). With ``after_block`` the
        source map is traced (the grid restore needs it) and the hook also sees the input tokens as layer −1."""
        _check_input(self, x)
        ctx = self._vitprune
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        trace_source = ctx.trace_source or after_block is not None
        state = TokenState.initial(x, self.num_prefix_tokens, grid=grid, trace_source=trace_source)
        if after_block is not None:
            after_block(-1, state)
        trace = Trace()
        blocks = self.blocks if depth is None else self.blocks[:depth]
        state = run_blocks(blocks, TimmBlockOps, state, ctx.method, trace, after_block)
        ctx.finish(state, trace)
        return state

    def forward_intermediates(self, x: Tensor, *args: Any, attn_mask: Tensor | None = None, is_causal: bool = False,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with full-grid features (see :mod:`vitprune.features`; ``fill=``)."""
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model changes the token count per block, so it cannot take attn_mask/is_causal")
        return features.forward_intermediates(self, self._vitprune_run, x, *args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        pooled = pool_reduced(x, pool_type, self._vitprune, self.attn_pool, skip)
        return super().pool(x, pool_type) if pooled is None else pooled  # type: ignore[misc]



def apply(model: nn.Module, ctx: PatchContext) -> None:
    swap_in(model, ctx, PatchedVisionTransformer)


def restore(model: nn.Module) -> None:
    swap_out(model)


register_backend("timm", is_timm_vit, sys.modules[__name__])
