"""timm ``Eva`` backend: EVA02, DINOv3 and the ``vit_*_rope_*`` ViTs, whose attention rotates q and k by RoPE.

Rotary positions must follow their tokens. The model's own rope table (``Eva._pos_embed``) gives each patch token
``[sin | cos]`` of its rotary angles; it travels in ``TokenState.pos`` and is gathered, merged (circular mean, see
``tokens.merge_tokens``) and appended (package tokens: no rotation) with the tokens, so every block rotates each
surviving token by its own position, never by the slot it happens to occupy. Prefix tokens (CLS, registers) get the
identity rotation, which is what timm does by leaving them out. Absolute position embeddings (EVA02) are added once
before the blocks, as in timm. As for ViT, only the model's class changes; ``unpatch`` restores it exactly.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import EXP_ATTR, AttentionScores, attend
from .. import features
from ..engine import PatchContext, run_blocks
from ..methods.base import ModelInfo, Trace
from ..registry import register_backend
from ..tokens import TokenState, no_rotation
from .swap import swap_in, swap_out
from .timm import _check_input, pool_reduced

from timm.layers.attention import AttentionRope
from timm.layers.attention_pool import AttentionPoolLatent
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "")


def unit_rotation(pos: Tensor) -> Tensor:
    """``[sin | cos]`` rows scaled so each (sin, cos) pair has length 1: a merged token's mean pair becomes the
    rotation by the circular mean angle (a pair of length 0, opposite angles that cancel, becomes no rotation)."""
    sin, cos = pos.float().chunk(2, dim=-1)
    r = (sin * sin + cos * cos).sqrt()  # (not torch.hypot: no ONNX op for it)
    empty = r < 1e-6
    inv = 1.0 / r.clamp_min(1e-6)
    return torch.cat([sin * inv, torch.where(empty, 1.0, cos * inv)], dim=-1)


class EvaBlockOps:
    """Runs the parts of a timm ``EvaBlock`` (pre-norm; fused or split qkv, EVA's k-less bias, sub-LN, gate,
    grouped-query heads, LayerScale as ``gamma_1/2``, SwiGLU or GELU MLP)."""

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.norm1(x)

    @staticmethod
    def attention(
        block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None, pos: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        attn = block.attn
        b, n, _ = h.shape
        q, k, v = _project_qkv(attn, h)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if pos is not None:
            rope = unit_rotation(pos).unsqueeze(1)  # [B, 1, N, 2D]: one rotation per token, shared by the heads
            q = apply_rot_embed_cat(q, rope, half=attn.rotate_half).type_as(v)
            k = apply_rot_embed_cat(k, rope, half=attn.rotate_half).type_as(v)
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:  # grouped-query attention: after rope, as timm does
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout = attn.attn_drop.p if attn.training else 0.0
        out, scores = attend(q, k, v, scale=attn.scale, size=size, keep=keep, exp=getattr(attn, EXP_ATTR, None),
                             dropout_p=dropout)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
        if attn.gate is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(out)), scores

    @staticmethod
    def attn_residual(block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if block.gamma_1 is not None:
            y = block.gamma_1 * y
        return x + block.drop_path1(y)

    @staticmethod
    def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
        y = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            y = block.gamma_2 * y
        return x + block.drop_path2(y)


def _project_qkv(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, H, N, D] q, k, v exactly as the module computes them (EVA keeps a zero k bias out of the parameters)."""
    b, n, _ = h.shape
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(h)
        elif attn.qkv_bias_separate:
            qkv = attn.qkv(h) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(h, weight=attn.qkv.weight, bias=torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    heads_kv = getattr(attn, "num_kv_heads", attn.num_heads)
    q = attn.q_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(h).reshape(b, n, heads_kv, -1).transpose(1, 2)
    v = attn.v_proj(h).reshape(b, n, heads_kv, -1).transpose(1, 2)
    return q, k, v


def is_timm_eva(model: nn.Module) -> bool:
    return isinstance(model, Eva)


def check_supported(model: nn.Module) -> None:
    """Raise one ValueError listing why this Eva model cannot be patched (if it cannot)."""
    problems = []
    if getattr(model, "rope_mixed", False):
        problems.append(
            "rope_type='mixed' (learned per-block, per-head rotary frequencies: a merged token would need its "
            "position per block and head, not one rotation)"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not EvaBlock:
            problems.append(f"block {i} is {type(block).__name__} (only the pre-norm EvaBlock is supported)")
            break
        if type(block.attn) not in (EvaAttention, AttentionRope):
            problems.append(f"block {i} attention is {type(block.attn).__name__}")
            break
        if block.attn.num_prefix_tokens != model.num_prefix_tokens:
            problems.append(f"block {i} leaves {block.attn.num_prefix_tokens} tokens unrotated, the model has "
                            f"{model.num_prefix_tokens} prefix tokens")
            break
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None and type(attn_pool) is not AttentionPoolLatent:
        problems.append(f"attention pool {type(attn_pool).__name__}")
    elif attn_pool is None and model.global_pool not in SUPPORTED_POOLS:
        problems.append(f"global_pool={model.global_pool!r} (supported: {', '.join(map(repr, SUPPORTED_POOLS))})")
    if problems:
        raise ValueError(
            f"cannot patch {type(model).__name__}: " + "; ".join(problems)
            + ". Supported: timm Eva models with pre-norm blocks, e.g. eva02_small_patch14_224, "
            "vit_small_patch16_dinov3, vit_base_patch16_rope_224"
        )


def mlp_macs_per_token(mlp: nn.Module) -> int:
    """Multiply-accumulates of the MLP per token: every Linear in it (GELU MLP, packed or split SwiGLU)."""
    return sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))


def model_info(model: nn.Module) -> ModelInfo:
    block = model.blocks[0]
    dim = model.embed_dim
    return ModelInfo(
        depth=len(model.blocks),
        dim=dim,
        num_heads=block.attn.num_heads,
        num_prefix=model.num_prefix_tokens,
        grid=tuple(model.patch_embed.grid_size),
        mlp_ratio=mlp_macs_per_token(block.mlp) / (2 * dim * dim),  # as a 2-layer MLP of that hidden width
        has_cls=model.cls_token is not None,
        patch_embed_macs=model.patch_embed.num_patches * model.patch_embed.proj.weight[0].numel() * dim,
        head_macs=model.head.weight.numel() if isinstance(model.head, nn.Linear) else 0,
    )


def initial_positions(rope: Tensor | None, x: Tensor, num_prefix: int) -> Tensor | None:
    """[B, N, 2D] rotary rows for all tokens (prefix: none) from timm's rope table ([N', 2D], or [B, 1, N', 2D]
    after patch dropout)."""
    if rope is None:
        return None
    b = x.shape[0]
    rope = rope.squeeze(1) if rope.dim() == 4 else rope.unsqueeze(0).expand(b, -1, -1)
    prefix = no_rotation(rope[:, :1]).expand(-1, num_prefix, -1)
    return torch.cat([prefix, rope], dim=1)


class PatchedEva:
    """Mixin placed in front of the model's own class; see module docstring."""

    _vitprune: PatchContext

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model changes the token count per block, so it cannot take attn_mask/is_causal")
        return self.norm(self._vitprune_run(x).x)

    def _vitprune_run(
        self, x: Tensor, depth: int | None = None, after_block: Callable[[int, TokenState], None] | None = None
    ) -> TokenState:
        """Images → the final TokenState of the first ``depth`` blocks (all by default); with ``after_block`` the
        source map is traced and the hook also sees the input tokens as layer −1 (see :mod:`vitprune.features`)."""
        _check_input(self, x)
        ctx = self._vitprune
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        pos = initial_positions(rope, x, self.num_prefix_tokens)
        trace_source = ctx.trace_source or after_block is not None
        state = TokenState.initial(x, self.num_prefix_tokens, grid=grid, trace_source=trace_source, pos=pos)
        if after_block is not None:
            after_block(-1, state)
        trace = Trace()
        blocks = self.blocks if depth is None else self.blocks[:depth]
        state = run_blocks(blocks, EvaBlockOps, state, ctx.method, trace, after_block)
        ctx.finish(state, trace)
        return state

    def forward_intermediates(self, x: Tensor, *args: Any, attn_mask: Tensor | None = None, is_causal: bool = False,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with full-grid features (see :mod:`vitprune.features`; ``fill=``)."""
        if attn_mask is not None or is_causal:
            raise ValueError("a patched model changes the token count per block, so it cannot take attn_mask/is_causal")
        if kwargs.get("output_dict"):
            raise ValueError("timm's Eva.forward_intermediates has no output_dict; leave it out")
        return features.forward_intermediates(self, self._vitprune_run, x, *args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        skip = 0 if self.attn_pool is not None else self.num_prefix_tokens  # timm's Eva.pool: MAP sees every token
        pooled = pool_reduced(x, pool_type, self._vitprune, self.attn_pool, skip)
        return super().pool(x, pool_type) if pooled is None else pooled  # type: ignore[misc]



def apply(model: nn.Module, ctx: PatchContext) -> None:
    swap_in(model, ctx, PatchedEva)


def restore(model: nn.Module) -> None:
    swap_out(model)


register_backend("timm_eva", is_timm_eva, sys.modules[__name__])
