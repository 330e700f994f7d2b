"""open_clip backend: a class swap of the image tower ``open_clip.transformer.VisionTransformer`` (``clip.visual``).

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=...)
    vitprune.patch(model.visual, "tome", r=8)     # model.encode_image(x) now runs the reduced tower

As for timm, only the tower's class changes: its ``forward`` embeds the patches as open_clip does (``_embeds``: conv,
class token, positions, patch dropout, ``ln_pre``), runs the ``ResidualAttentionBlock`` s through the shared engine,
and ends with the tower's own pooling and projection. Parameters, buffers and submodules are never touched, so
``unpatch`` restores the tower exactly.

The blocks' ``nn.MultiheadAttention`` is run from its packed ``in_proj_weight`` with the shared ``attend`` (SDPA with
the log(size) bias), so merged tokens get proportional attention as on every backend. Pooling counts a merged token
for the patches it stands for: ``pool_type='avg'`` (CLIPA) is a size-weighted mean, and the attentional poolers
(CoCa) attend with ``log(size)`` added to their logits. ``output_tokens=True`` returns the reduced tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import EXP_ATTR, MASK_EPS, AttentionScores, attend, size_bias
from ..engine import PatchContext, run_blocks
from ..kernels import fast_path_enabled, gelu_mlp_inplace
from ..methods.base import ModelInfo, Trace
from ..registry import register_backend
from ..tokens import TokenState
from .swap import no_intermediates, swap_in, swap_out

try:
    import open_clip
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import AttentionalPooler, PatchDropout, ResidualAttentionBlock, VisionTransformer
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's open_clip backend needs open_clip: pip install 'vitprune[open_clip]'") from e

_WRAPPERS: tuple[type, ...] = (CLIP, CustomTextCLIP, CoCa)  # whole models: their image tower is ``.visual``


# ---- running a block ---------------------------------------------------------------------------------------

class OpenClipBlockOps:
    """Runs the parts of an open_clip ``ResidualAttentionBlock`` (pre-norm, ``nn.MultiheadAttention``, optional
    LayerScale ``ls_1``/``ls_2``, ``c_fc`` → act → ``c_proj`` MLP). Tokens are [B, N, C] whatever the transformer's
    ``batch_first``: the attention is computed here from the module's weights, not by calling it."""

    @staticmethod
    def norm1(block: nn.Module, x: Tensor) -> Tensor:
        return block.ln_1(x)

    @staticmethod
    def attention(
        block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        attn: nn.MultiheadAttention = block.attn
        b, n, c = h.shape
        # in_proj packs [W_q; W_k; W_v] along the output dim, each split into heads of head_dim
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = attn.dropout if attn.training else 0.0
        out, scores = attend(q, k, v, scale=attn.head_dim ** -0.5, size=size, keep=keep,
                             exp=getattr(attn, EXP_ATTR, None), dropout_p=dropout)
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, c)), scores

    @staticmethod
    def attn_residual(block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + block.ls_1(y)

    @staticmethod
    def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
        mlp = block.mlp
        if fast_path_enabled(block) and _plain_gelu_mlp(mlp):
            return x.add_(block.ls_2(gelu_mlp_inplace(mlp.c_fc, mlp.gelu, mlp.c_proj, block.ln_2(x))))
        return x + block.ls_2(mlp(block.ln_2(x)))


def _plain_gelu_mlp(mlp: nn.Module) -> bool:
    """c_fc → nn.GELU → c_proj and nothing else (not QuickGELU), so the workspace fast path is exact."""
    return (
        type(mlp) is nn.Sequential
        and len(mlp) == 3
        and type(getattr(mlp, "c_fc", None)) is nn.Linear
        and type(getattr(mlp, "gelu", None)) is nn.GELU
        and type(getattr(mlp, "c_proj", None)) is nn.Linear
    )


# ---- what can be patched -----------------------------------------------------------------------------------

def is_open_clip(model: nn.Module) -> bool:
    """An open_clip image tower, or an open_clip model/tower that ``check_supported`` explains how to patch."""
    return isinstance(model, (VisionTransformer, TimmModel, ModifiedResNet, *_WRAPPERS))


def check_supported(model: nn.Module) -> None:
    """Raise one ValueError listing why this open_clip model cannot be patched (if it cannot)."""
    if isinstance(model, _WRAPPERS):
        raise ValueError(
            f"{type(model).__name__} is the whole open_clip model; patch its image tower instead: "
            "vitprune.patch(model.visual, ...) (model.encode_image then runs the reduced tower)"
        )
    if isinstance(model, TimmModel):
        raise ValueError(
            "this open_clip image tower wraps a timm model (TimmModel); patch the timm model inside it: "
            "vitprune.patch(model.visual.trunk, ...)"
        )
    if isinstance(model, ModifiedResNet):
        raise ValueError("open_clip's ModifiedResNet image tower is a CNN: it has no tokens to reduce")
    problems = _block_problems(model) + _pool_problems(model)
    if problems:
        raise ValueError(
            f"cannot patch {type(model).__name__}: " + "; ".join(problems)
            + ". Supported: open_clip ViT image towers with the default blocks (e.g. ViT-B-32, ViT-L-14, CLIPA, CoCa)"
        )


def _block_problems(model: nn.Module) -> list[str]:
    for i, block in enumerate(model.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            return [f"block {i} is {type(block).__name__} (only ResidualAttentionBlock; the 'custom' block type with "
                    "qk_norm / scaled cosine attention / extra norms is not supported)"]
        attn = block.attn
        if hasattr(block, "ln_1_kv"):
            return [f"block {i} is a cross-attention block"]
        if type(attn) is not nn.MultiheadAttention:
            return [f"block {i} attention is {type(attn).__name__} (expected nn.MultiheadAttention)"]
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            return [f"block {i} attention has separate q/k/v weights, bias_k/bias_v or add_zero_attn"]
    return []


def _pool_problems(model: nn.Module) -> list[str]:
    """The attentional poolers are run with a size mask through their own submodules, so their forward must be the
    one this backend knows (``AttentionalPooler``: ln_k → ln_q(query) → MultiheadAttention)."""
    problems = []
    for name in ("attn_pool", "attn_pool_contrastive"):
        pool = getattr(model, name, None)
        if pool is not None and type(pool) is not AttentionalPooler:
            problems.append(f"{name} is {type(pool).__name__}: it cannot take the log(size) mask merged tokens need")
    if model.attn_pool is not None and getattr(model, "attn_pool_contrastive", None) is not None:
        if model.attn_pool_type not in ("parallel", "cascade"):
            problems.append(f"attn_pool_type={model.attn_pool_type!r}")
    return problems


def model_info(model: nn.Module) -> ModelInfo:
    block = model.transformer.resblocks[0]
    dim = model.conv1.out_channels
    grid = tuple(model.grid_size)
    proj = model.proj
    return ModelInfo(
        depth=len(model.transformer.resblocks),
        dim=dim,
        num_heads=block.attn.num_heads,
        num_prefix=1,  # the class token
        grid=grid,
        mlp_ratio=block.mlp.c_fc.out_features / dim,
        has_cls=True,
        patch_embed_macs=grid[0] * grid[1] * model.conv1.weight[0].numel() * dim,
        head_macs=proj.numel() if proj is not None else 0,  # the projection (an attentional pooler not included)
    )


# ---- the patched forward -----------------------------------------------------------------------------------

def _check_input(model: nn.Module, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images as a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    if x.shape[1] != model.conv1.in_channels:
        raise ValueError(f"model expects {model.conv1.in_channels} input channel(s), got {x.shape[1]}")
    h, w = model.image_size
    if tuple(x.shape[-2:]) != (h, w):
        raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the model's {h}x{w} (its position "
                         f"embedding is fixed); resize the images to {h}x{w}")
    if model.training and isinstance(model.patch_dropout, PatchDropout) and model.patch_dropout.prob > 0:
        raise ValueError("patch dropout is active (training mode, patch_dropout > 0): it drops patches at random, so "
                         "token positions and counts no longer match what the method planned for; set "
                         "model.patch_dropout = torch.nn.Identity() or train without it")
    if model.training and model.transformer.grad_checkpointing:
        raise ValueError("gradient checkpointing is not supported on a vitprune-patched tower; "
                         "model.set_grad_checkpointing(False) first")


def pool_weights(ctx: PatchContext, n: int) -> Tensor | None:
    """[B, n, 1] weight of each final token (its size, times its keep mask while a selector trains); None when
    nothing was reduced, so the tower's own pooling runs unchanged."""
    size, keep = ctx.final_size, ctx.final_keep
    if keep is not None and keep.shape[1] == n:
        size = keep.unsqueeze(-1) if size is None else size * keep.unsqueeze(-1)
    if size is not None and size.shape[1] != n:
        return None
    return size


def masked_attn_pool(pool: nn.Module, x: Tensor, bias: Tensor) -> Tensor:
    """``AttentionalPooler.forward`` with an additive key mask ``bias`` [B, 1, 1, N] (log of token sizes).

    The pooler's own forward takes no mask, so its parts are called here in its order; its
    ``nn.MultiheadAttention`` takes a float mask of shape [B·heads, queries, N].
    """
    b = x.shape[0]
    x = pool.ln_k(x)
    q = pool.ln_q(pool.query).unsqueeze(0).expand(b, -1, -1)
    heads = pool.attn.num_heads
    mask = bias.expand(-1, heads, q.shape[1], -1).reshape(b * heads, q.shape[1], x.shape[1])
    return pool.attn(q, x, x, attn_mask=mask, need_weights=False)[0]


class PatchedOpenClipVisionTransformer:
    """Mixin placed in front of the tower's own class; see module docstring."""

    _vitprune: PatchContext

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        _check_input(self, x)
        ctx = self._vitprune
        x = self._embeds(x)
        state = TokenState.initial(x, 1, grid=tuple(self.grid_size), trace_source=ctx.trace_source)
        trace = Trace()
        state = run_blocks(self.transformer.resblocks, OpenClipBlockOps, state, ctx.method, trace)
        ctx.finish(state, trace)
        pooled, tokens = self._pool(state.x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The tower's ``_pool``, with each token weighted by its size once tokens were reduced."""
        w = pool_weights(self._vitprune, x.shape[1])
        if w is None:
            return super()._pool(x)  # type: ignore[misc]
        if self.attn_pool is not None:
            return self._attn_pool(x, size_bias(w.clamp_min(MASK_EPS), x.dtype))
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        if self.pool_type == "avg":
            w = w[:, 1:].to(x.dtype)
            pooled, tokens = (x[:, 1:] * w).sum(dim=1) / w.sum(dim=1), x[:, 1:]
        else:
            pooled, tokens = self._global_pool(x)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled, tokens

    def _attn_pool(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """open_clip's two attentional-pool layouts, every pooler over image tokens attending with ``bias``."""
        if self.attn_pool_contrastive is not None:  # 'parallel' / 'cascade'
            x = self.ln_post(x)
            tokens = masked_attn_pool(self.attn_pool, x, bias)
            if self.attn_pool_type == "parallel":
                return masked_attn_pool(self.attn_pool_contrastive, x, bias), tokens
            return self.attn_pool_contrastive(tokens), tokens  # cascade: pools the queries, not image tokens
        x = self.ln_post(masked_attn_pool(self.attn_pool, x, bias))  # CoCa: pool, then global pool over queries
        return self._global_pool(x)

    forward_intermediates = no_intermediates


def apply(model: nn.Module, ctx: PatchContext) -> None:
    swap_in(model, ctx, PatchedOpenClipVisionTransformer)


def restore(model: nn.Module) -> None:
    swap_out(model)


# ---- building towers by name (vitprune.models.create_model("open_clip:ViT-B-32")) -----------------------------

def create_open_clip_visual(
    name: str, *, checkpoint: str | Path | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """``open_clip.create_model(name, pretrained=None, **kwargs).visual`` in eval mode, described for vitprune's
    tools (``describe_for_tools``). Random weights unless ``checkpoint``: the tower's own state dict (open_clip's
    keys without the ``visual.`` prefix), loaded strictly."""
    from ..models import load_checkpoint

    if pretrained:
        raise ValueError(f"open_clip:{name} is built without weights (open_clip's pretrained tags need its hub); pass "
                         "a checkpoint of the image tower, or patch open_clip.create_model(name, pretrained=tag).visual")
    if ":" not in name and name not in open_clip.list_models():  # hf-hub:/local-dir: names go to open_clip as is
        raise ValueError(f"open_clip has no model {name!r}; see open_clip.list_models() (e.g. 'ViT-B-32')")
    visual = open_clip.create_model(name, pretrained=None, **kwargs).visual
    if not isinstance(visual, VisionTransformer):
        check_supported(visual)  # a TimmModel or ResNet tower: says what to do instead
    if checkpoint is not None:
        load_checkpoint(visual, checkpoint)
    return describe_for_tools(visual, f"open_clip:{name}").eval()


def describe_for_tools(visual: nn.Module, architecture: str = "open_clip") -> nn.Module:
    """Give a tower the timm-style names the bench and other tools read (``patch_embed``, ``blocks``,
    ``num_prefix_tokens``, ``pretrained_cfg``) as plain attributes: no submodule is added, so parameters and
    ``state_dict`` keys stay open_clip's. Returns the tower."""
    size = tuple(visual.image_size)
    grid = tuple(visual.grid_size)
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    interpolation = pp.get("interpolation", "bicubic")
    visual.patch_embed = SimpleNamespace(proj=visual.conv1, img_size=size, grid_size=grid,
                                         num_patches=grid[0] * grid[1], patch_size=tuple(visual.patch_size),
                                         strict_img_size=True)
    visual.blocks = tuple(visual.transformer.resblocks)
    visual.num_prefix_tokens = 1
    visual.pretrained_cfg = dict(
        architecture=architecture, input_size=(visual.conv1.in_channels, *size), num_classes=0,
        mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=interpolation, crop_pct=1.0, crop_mode="center",
    )
    visual.default_cfg = visual.pretrained_cfg
    return visual


register_backend("open_clip", is_open_clip, sys.modules[__name__])
