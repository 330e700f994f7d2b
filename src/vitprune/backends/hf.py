"""Hugging Face transformers backend: a thin class swap of the vision encoders ``ViTModel``, ``DeiTModel``,
``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` and ``SiglipVisionModel``.

Like the timm backend, only classes change: the encoder model (found inside ``*ForImageClassification`` wrappers,
``CLIPVisionModelWithProjection`` and the image–text models ``CLIPModel`` / ``SiglipModel`` too) gets a ``forward``
that runs its layers through the shared engine with the shared attention (``attend``: SDPA with the log(size) bias).
Parameters, buffers and submodules are never touched, so ``unpatch`` is exact. In ``CLIPModel`` / ``SiglipModel``
only the vision tower is swapped: ``get_image_features`` and ``forward`` call it, the text tower is untouched.

The wrappers' own heads read only prefix tokens (CLS, DeiT's distillation token; CLIP's ``post_layernorm`` and
projection read CLS), which no method reduces, so they stay as they are. The heads of
``Dinov2(WithRegisters)ForImageClassification`` (CLS ‖ mean) and ``CLIP/SiglipForImageClassification`` (mean) average
the patch tokens; their classes are swapped too, so the average counts each token for the patches it stands for (as
the timm backend's ``avg`` pool does).

SigLIP has no CLS token (``ModelInfo.has_cls=False``: attention-scored methods rank tokens by the attention they
receive) and pools with an attention head (``SiglipMultiheadAttentionPoolingHead``); its probe attends over the
reduced tokens with the same ``log(size)`` bias as every block, as timm's MAP head does.

Once tokens are reduced, HF's per-layer outputs change meaning:

- ``output_hidden_states``: ``depth + 1`` tensors, the embeddings (CLIP: after ``pre_layrnorm``, as in HF) and then
  each block's output, each with the token count it had after that block's reduction
  (``last_trace(model).tokens_mlp``), prefix tokens first.
- ``output_attentions``: per block the attention probabilities the block used, ``[B, heads, N_l, N_l]`` over the
  tokens entering it (``tokens_attn``), size bias (and selector mask) included. SDPA never materialises them, so they
  are computed on the side only when asked for, whatever ``attn_implementation`` says.
"""
from __future__ import annotations

import sys

from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import EXP_ATTR, AttentionScores, attend, masked_softmax
from ..engine import PatchContext, run_blocks
from ..methods.base import ModelInfo, Trace
from ..tokens import TokenState
from ..registry import register_backend
from .swap import original_class, patched_class
from .timm import pool_reduced

try:
    from transformers import (CLIPForImageClassification, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection,
                              DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel,
                              Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersForImageClassification,
                              Dinov2WithRegistersModel, PreTrainedModel, SiglipForImageClassification, SiglipModel,
                              SiglipVisionModel, ViTForImageClassification, ViTModel)
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPPreTrainedModel
    from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTPreTrainedModel
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer, Dinov2PreTrainedModel
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersAttention, Dinov2WithRegistersLayer, Dinov2WithRegistersPreTrainedModel)
    from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer, SiglipPreTrainedModel
    from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTPreTrainedModel
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's Hugging Face backend needs transformers >= 5: pip install 'vitprune[hf]'") from e

ENCODERS: tuple[type, ...] = (ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel,
                              SiglipVisionModel)
CLASSIFIERS: tuple[type, ...] = (
    ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification, CLIPForImageClassification,
    SiglipForImageClassification,
)
# models that hold a CLIP/SigLIP vision tower as ``.vision_model`` (next to a projection, a text tower, a classifier)
TOWER_HOLDERS: tuple[type, ...] = (CLIPVisionModelWithProjection, CLIPModel, SiglipModel, CLIPForImageClassification,
                                   SiglipForImageClassification)
SUPPORTED = ENCODERS + CLASSIFIERS + TOWER_HOLDERS
_FAMILY_TYPES = (ViTPreTrainedModel, DeiTPreTrainedModel, Dinov2PreTrainedModel, Dinov2WithRegistersPreTrainedModel,
                 CLIPPreTrainedModel, SiglipPreTrainedModel)
_DINOV2 = (Dinov2Model, Dinov2WithRegistersModel)  # layers in model.encoder.layer; LayerScale; always interpolate
_TOWERS = (CLIPVisionModel, SiglipVisionModel)  # CLIP-style layers (layer_norm1, self_attn, out_proj)
_DINOV2_CLASSIFIERS = (Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification)
# classifiers whose head reads a mean over the patch tokens (Dinov2: CLS ‖ mean; CLIP, SigLIP: the mean alone)
_MEAN_CLASSIFIERS = _DINOV2_CLASSIFIERS + (CLIPForImageClassification, SiglipForImageClassification)
# kwargs HF wrappers may pass down that do not change the encoder's result (the loss's normaliser, a cache flag)
_HARMLESS_KWARGS = ("num_items_in_batch", "use_cache")
INNER_ATTR = "_vitprune_inner"  # the PatchContext on every swapped module (the top model also has ``_vitprune``)


# ---- running a block ---------------------------------------------------------------------------------------

class HFBlockOps:
    """Runs the parts of a transformers ViT/DeiT/Dinov2 layer; optionally records per-block outputs.

    ``hidden_states``/``attentions``: lists to append each block's output / attention probabilities to (for
    ``output_hidden_states``/``output_attentions``), or None. The shared instances below record nothing.
    ``ATTN``/``OUT``: where a layer keeps its attention module and that module its output projection (subclasses
    for other families rename them; ``check_supported`` checks they are there).
    """

    ATTN = "attention"
    OUT = "o_proj"

    def __init__(self, hidden_states: list[Tensor] | None = None, attentions: list[Tensor] | None = None) -> None:
        self.hidden_states = hidden_states
        self.attentions = attentions

    def norm1(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.layernorm_before(x)

    def scale_and_dropout(self, attn: nn.Module) -> tuple[float, float]:
        """The attention's logit scale and (in training) its dropout probability."""
        return attn.scaling, attn.attention_dropout if attn.training else 0.0

    def attention(
        self, block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        attn = getattr(block, self.ATTN)
        b, n, _ = h.shape

        def heads(layer: nn.Module) -> Tensor:
            return layer(h).view(b, n, -1, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
        exp = getattr(attn, EXP_ATTR, None)
        scale, dropout = self.scale_and_dropout(attn)
        out, scores = attend(q, k, v, scale=scale, size=size, keep=keep, exp=exp, dropout_p=dropout)
        if self.attentions is not None:
            logits = (q * scale) @ k.transpose(-2, -1)
            if scores.bias is not None:
                logits = logits + scores.bias
            self.attentions.append(masked_softmax(logits, scores.keep, exp or torch.exp).to(q.dtype))
        return getattr(attn, self.OUT)(out.transpose(1, 2).reshape(b, n, -1)), scores

    def attn_residual(self, block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + block.dropout(y)

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        return self._record(x + block.dropout(block.mlp(block.layernorm_after(x))))

    def _record(self, x: Tensor) -> Tensor:
        if self.hidden_states is not None:
            self.hidden_states.append(x)
        return x


class HFDinov2BlockOps(HFBlockOps):
    """Dinov2 layers: other norm names, LayerScale and DropPath; the MLP may be SwiGLU (called as a module)."""

    def norm1(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.norm1(x)

    def attn_residual(self, block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + block.drop_path(block.layer_scale1(y))

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        return self._record(x + block.drop_path(block.layer_scale2(block.mlp(block.norm2(x)))))


class HFTowerBlockOps(HFBlockOps):
    """CLIP / SigLIP encoder layers: ``layer_norm1`` → ``self_attn`` (``out_proj``) → residual, ``layer_norm2`` → MLP
    → residual; no dropout or LayerScale on the residuals."""

    ATTN = "self_attn"
    OUT = "out_proj"

    def norm1(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.layer_norm1(x)

    def scale_and_dropout(self, attn: nn.Module) -> tuple[float, float]:
        return attn.scale, attn.dropout if attn.training else 0.0

    def attn_residual(self, block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x + y

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        return self._record(x + block.mlp(block.layer_norm2(x)))


# per encoder class: (its layer class, that layer's attention class, the ops that run it)
_LAYERS: dict[type, tuple[type, type, type[HFBlockOps]]] = {
    ViTModel: (ViTLayer, ViTAttention, HFBlockOps),
    DeiTModel: (DeiTLayer, DeiTAttention, HFBlockOps),
    Dinov2Model: (Dinov2Layer, Dinov2Attention, HFDinov2BlockOps),
    Dinov2WithRegistersModel: (Dinov2WithRegistersLayer, Dinov2WithRegistersAttention, HFDinov2BlockOps),
    CLIPVisionModel: (CLIPEncoderLayer, CLIPAttention, HFTowerBlockOps),
    SiglipVisionModel: (SiglipEncoderLayer, SiglipAttention, HFTowerBlockOps),
}


def _family(encoder: nn.Module) -> tuple[type, type, type[HFBlockOps]]:
    return next(v for c, v in _LAYERS.items() if isinstance(encoder, c))


def _ops_class(encoder: nn.Module) -> type[HFBlockOps]:
    return _family(encoder)[2]


# ---- finding the parts of a model --------------------------------------------------------------------------

class HFVisionModel(nn.Module):
    """A transformers model seen as vitprune's tools (bench, viz) see timm models: images in, one tensor out.

    ``forward`` returns the logits of a ``*ForImageClassification`` model; the image embedding of a CLIP/SigLIP
    model (``image_embeds`` / ``get_image_features``); else the encoder's pooled feature (timm's ``num_classes=0``
    output): the CLS token after the final norm, or SigLIP's attention-pooled feature (without its head: the mean of
    the tokens, each counted for the patches it stands for). ``patch_embed``, ``blocks``, ``num_prefix_tokens`` and
    ``pretrained_cfg`` answer with timm's names. ``vitprune.patch`` accepts it like the model it wraps (``.hf``).
    ``vitprune.models.create_model("hf:...")`` returns one.
    """

    def __init__(self, hf: nn.Module, pretrained_cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(hf, SUPPORTED):
            raise ValueError(f"HFVisionModel wraps one of {', '.join(c.__name__ for c in SUPPORTED)}; "
                             f"got {type(hf).__name__}")
        self.hf = hf
        self.pretrained_cfg = dict(pretrained_cfg or default_pretrained_cfg(hf))
        self.default_cfg = self.pretrained_cfg

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if isinstance(self.hf, (CLIPModel, SiglipModel)):
            return self.hf.get_image_features(pixel_values=x, return_dict=True, **kwargs).pooler_output
        out = self.hf(pixel_values=x, return_dict=True, **kwargs)
        for name in ("logits", "image_embeds", "pooler_output"):
            if getattr(out, name, None) is not None and (name != "pooler_output" or self._pools_itself):
                return getattr(out, name)
        if self.num_prefix_tokens == 0:  # SigLIP without its head: the mean of the tokens, size-weighted
            ctx = getattr(self.encoder_model, INNER_ATTR, None)
            pooled = None if ctx is None else pool_reduced(out.last_hidden_state, "avg", ctx, None, 0)
            return out.last_hidden_state.mean(dim=1) if pooled is None else pooled
        return out.last_hidden_state[:, 0]

    @property
    def _pools_itself(self) -> bool:
        """CLIP's pooler is post_layernorm(CLS) and SigLIP's the attention head, timm's pooled feature in both;
        ViT's pooler is a trained dense+tanh layer that timm models do not have, so it is not the output."""
        return isinstance(self.encoder_model, _TOWERS)

    @property
    def encoder_model(self) -> nn.Module:
        return _encoder(self.hf)

    @property
    def patch_embed(self) -> SimpleNamespace:
        proj, size, patch = _patch_geometry(self.encoder_model)
        grid = (size[0] // patch[0], size[1] // patch[1])
        return SimpleNamespace(proj=proj, img_size=size, grid_size=grid, num_patches=grid[0] * grid[1],
                               patch_size=patch, strict_img_size=True)

    @property
    def blocks(self) -> nn.ModuleList:
        return _blocks(self.encoder_model)

    @property
    def num_prefix_tokens(self) -> int:
        return _num_prefix(self.encoder_model)

    @property
    def embed_dim(self) -> int:
        return self.encoder_model.config.hidden_size

    @property
    def num_classes(self) -> int:
        return self.hf.config.num_labels if isinstance(self.hf, CLASSIFIERS) else 0


# Preprocessing of HF's image processors per family: (mean, std, interpolation, crop_pct). ViT and SigLIP resize
# straight to the input size; DeiT, Dinov2 resize to 256 and centre-crop 224; CLIP resizes the short side and crops.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 224 / 256)
_PREPROCESSING: tuple[tuple[type, tuple[tuple[float, ...], tuple[float, ...], str, float]], ...] = (
    (ViTPreTrainedModel, ((0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)),
    (SiglipPreTrainedModel, ((0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)),
    (CLIPPreTrainedModel, ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic", 1.0)),
)


def default_pretrained_cfg(hf: nn.Module) -> dict[str, Any]:
    """timm-style preprocessing defaults for a transformers model: the input size it was built for and the
    normalisation HF's own image processors use for the family (``_PREPROCESSING``; ImageNet's otherwise)."""
    encoder = _encoder(hf)
    _, size, _ = _patch_geometry(encoder)
    c = encoder.config.num_channels
    mean, std, interpolation, crop_pct = next((p for t, p in _PREPROCESSING if isinstance(hf, t)), _IMAGENET)
    return dict(architecture=type(hf).__name__, input_size=(c, *size), interpolation=interpolation,
                crop_pct=crop_pct, crop_mode="center", mean=mean[:c], std=std[:c],
                num_classes=hf.config.num_labels if isinstance(hf, CLASSIFIERS) else 0)


def _hf(model: nn.Module) -> nn.Module:
    return model.hf if isinstance(model, HFVisionModel) else model


def _encoder(hf: nn.Module) -> nn.Module:
    """The module whose class is swapped: the vision encoder (CLIP/SigLIP: the vision tower)."""
    if isinstance(hf, TOWER_HOLDERS):
        return hf.vision_model
    return hf.base_model if isinstance(hf, PreTrainedModel) else hf


def _blocks(encoder: nn.Module) -> nn.ModuleList:
    if isinstance(encoder, _DINOV2):
        return encoder.encoder.layer
    return encoder.encoder.layers if isinstance(encoder, _TOWERS) else encoder.layers


def _num_prefix(encoder: nn.Module) -> int:
    """Tokens before the patches: CLS (+ DeiT's distillation token, + Dinov2's registers); SigLIP has none."""
    if isinstance(encoder, SiglipVisionModel):
        return 0
    if isinstance(encoder, Dinov2WithRegistersModel):
        return 1 + encoder.config.num_register_tokens
    return 2 if isinstance(encoder, DeiTModel) else 1


def _pair(v: Any) -> tuple[int, int]:
    return (v[0], v[1]) if isinstance(v, (tuple, list)) else (v, v)


def _patch_geometry(encoder: nn.Module) -> tuple[nn.Conv2d, tuple[int, int], tuple[int, int]]:
    """(patch projection, image size, patch size): ViT/DeiT/Dinov2 keep them in ``embeddings.patch_embeddings``,
    CLIP/SigLIP in ``embeddings`` itself."""
    emb = encoder.embeddings
    pe = getattr(emb, "patch_embeddings", None)
    if pe is not None:
        return pe.projection, _pair(pe.image_size), _pair(pe.patch_size)
    return emb.patch_embedding, _pair(emb.image_size), _pair(emb.patch_size)


def is_hf_vit(model: nn.Module) -> bool:
    """A transformers model of a family this backend knows (supported or not: ``check_supported`` says why not), or
    the adapter."""
    return isinstance(model, HFVisionModel) or isinstance(model, _FAMILY_TYPES)


def supported_names() -> str:
    """The supported classes, for error messages."""
    return ", ".join(c.__name__ for c in SUPPORTED)


def check_supported(model: nn.Module) -> None:
    """Raise one ValueError listing why this transformers model cannot be patched (if it cannot)."""
    hf = _hf(model)
    top = original_class(type(hf))
    if not issubclass(top, SUPPORTED):
        raise ValueError(
            f"cannot patch {top.__name__}: supported transformers classes are {supported_names()}. "
            "Masked-image-modeling and backbone classes reshape the tokens into the patch grid, which token reduction "
            "breaks, and text towers have no image tokens; patch the vision encoder (e.g. model.vit, "
            "model.vision_model) instead."
        )
    encoder = _encoder(hf)
    if getattr(model, "_vitprune", None) is None:
        if encoder is not hf and getattr(encoder, "_vitprune", None) is not None:
            raise ValueError(f"its vision encoder ({type(encoder).__name__}) is patched on its own; "
                             "vitprune.unpatch that module first")
        if any(hasattr(m, INNER_ATTR) for m in (hf, encoder)):
            raise ValueError("this model is part of a model that vitprune already patched; unpatch that model first")
    problems = _layer_problems(encoder)
    if problems:
        raise ValueError(
            f"cannot patch {top.__name__}: " + "; ".join(problems)
            + ". vitprune's HF backend follows the transformers 5 layout (tested with 5.24); upgrade transformers."
        )


def _layer_problems(encoder: nn.Module) -> list[str]:
    """What differs from the layout the block ops expect (layer/attention classes, projection names)."""
    layer_cls, attn_cls, ops = _family(encoder)
    try:
        blocks = _blocks(encoder)
    except AttributeError:
        return ["its layers are not where transformers 5 keeps them (model.layers / model.encoder.layer(s))"]
    projections = ("q_proj", "k_proj", "v_proj", ops.OUT)
    for i, block in enumerate(blocks):
        if type(block) is not layer_cls:
            return [f"layer {i} is {type(block).__name__} (expected {layer_cls.__name__})"]
        attn = getattr(block, ops.ATTN, None)
        if type(attn) is not attn_cls or not all(hasattr(attn, p) for p in projections):
            return [f"layer {i} attention is {type(attn).__name__} without {'/'.join(projections)}"]
    return []


def model_info(model: nn.Module) -> ModelInfo:
    hf = _hf(model)
    encoder = _encoder(hf)
    cfg = encoder.config
    proj, size, patch = _patch_geometry(encoder)
    grid = (size[0] // patch[0], size[1] // patch[1])
    mlp = _blocks(encoder)[0].mlp
    # MACs per token are 2·ratio·C²; SwiGLU has three C×h matrices, so its equivalent ratio is 1.5·h/C
    hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 1.5 * mlp.down_proj.in_features
    num_prefix = _num_prefix(encoder)
    return ModelInfo(
        depth=len(_blocks(encoder)),
        dim=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_prefix=num_prefix,
        grid=grid,
        mlp_ratio=hidden / cfg.hidden_size,
        has_cls=num_prefix > 0,  # SigLIP: attention-scored methods rank tokens by the attention they receive
        patch_embed_macs=grid[0] * grid[1] * proj.weight[0].numel() * cfg.hidden_size,
        head_macs=_head_macs(hf, encoder, num_prefix + grid[0] * grid[1]),
    )


def _head_macs(hf: nn.Module, encoder: nn.Module, num_tokens: int) -> int:
    """MACs per image of what runs after the blocks: classifiers, ViT's pooler, CLIP's projection, SigLIP's head.

    SigLIP's attention-pooling head projects every token to keys and values, so its MACs shrink with the tokens;
    ModelInfo holds one figure, the one at the full token count (what ``count_macs`` measures without reduction).
    """
    linears = [getattr(hf, n, None) for n in ("classifier", "cls_classifier", "distillation_classifier",
                                               "visual_projection")]
    linears.append(getattr(getattr(encoder, "pooler", None), "dense", None))
    macs = sum(h.weight.numel() for h in linears if isinstance(h, nn.Linear))
    head = getattr(encoder, "head", None) if isinstance(encoder, SiglipVisionModel) else None
    if head is not None:
        c = encoder.config.hidden_size
        # probe query and output projection (one token), keys and values of every token, q·kᵀ and attn·v, MLP
        macs += 2 * c * c + 2 * num_tokens * c * c + 2 * num_tokens * c + 2 * head.mlp.fc1.weight.numel()
    return macs


# ---- the patched forwards ----------------------------------------------------------------------------------

def _check_input(encoder: nn.Module, x: Tensor | None, interpolate: bool) -> None:
    if x is None:
        raise ValueError("pass the images as pixel_values, a [B, C, H, W] tensor")
    if x.dim() != 4:
        raise ValueError(f"expected images as a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    proj, size, patch = _patch_geometry(encoder)
    if x.shape[1] != proj.in_channels:
        raise ValueError(f"model expects {proj.in_channels} input channel(s), got {x.shape[1]}; "
                         "convert the images first")
    if x.shape[-2] < patch[0] or x.shape[-1] < patch[1]:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is smaller than one {patch[0]}x{patch[1]} patch")
    if not interpolate and tuple(x.shape[-2:]) != size:
        raise ValueError(
            f"image size {tuple(x.shape[-2:])} does not match the model's {size[0]}x{size[1]}; resize the images to "
            f"{size[0]}x{size[1]}, or pass interpolate_pos_encoding=True to resample the position embeddings"
        )


def _output_flags(config: Any, kwargs: dict[str, Any]) -> tuple[Any, bool, bool]:
    """(output_hidden_states, output_attentions, return_dict) from kwargs or the config; unknown kwargs raise."""
    hidden = kwargs.pop("output_hidden_states", None)
    attentions = kwargs.pop("output_attentions", None)
    return_dict = kwargs.pop("return_dict", None)
    if kwargs.pop("is_causal", None):
        raise ValueError("a ViT attends bidirectionally; is_causal=True is not supported by a vitprune-patched model")
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS_KWARGS and v is not None)
    if unknown:
        raise ValueError(f"a vitprune-patched model does not take {', '.join(unknown)}; vitprune.unpatch(model) first")
    hidden = getattr(config, "output_hidden_states", False) if hidden is None else hidden
    attentions = getattr(config, "output_attentions", False) if attentions is None else attentions
    return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    return hidden, bool(attentions), bool(return_dict)


def _select(states: list[Tensor], flag: Any) -> tuple[Tensor | None, ...]:
    """HF's ``output_hidden_states`` may be an index or a list of indices: keep those, None elsewhere."""
    if isinstance(flag, bool):
        return tuple(states)
    n = len(states)
    wanted = {i % n for i in ([flag] if isinstance(flag, int) else list(flag)) if -n <= i < n}
    return tuple(s if i in wanted else None for i, s in enumerate(states))


class PatchedHFEncoder:
    """Mixin placed in front of ``ViTModel``/``DeiTModel`` (same signature as theirs); see module docstring."""

    def forward(
        self,
        pixel_values: Tensor | None = None,
        bool_masked_pos: Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return _encoder_forward(self, pixel_values, bool_masked_pos, bool(interpolate_pos_encoding), attention_mask,
                                kwargs)


class PatchedHFDinov2Encoder:
    """Mixin placed in front of ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (same signature as theirs: no
    ``interpolate_pos_encoding``, since Dinov2 always resamples its position embeddings; the keyword is accepted and
    has nothing to change)."""

    def forward(
        self,
        pixel_values: Tensor | None = None,
        bool_masked_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("interpolate_pos_encoding", None)
        return _encoder_forward(self, pixel_values, bool_masked_pos, True, attention_mask, kwargs)


class PatchedHFTower:
    """Mixin placed in front of ``CLIPVisionModel`` / ``SiglipVisionModel`` (same signature as theirs)."""

    def forward(self, pixel_values: Tensor | None = None, interpolate_pos_encoding: bool | None = False,
                **kwargs: Any) -> Any:
        return _tower_forward(self, pixel_values, bool(interpolate_pos_encoding), kwargs)


def _start(self: nn.Module, pixel_values: Tensor | None, interpolate: bool, attention_mask: Tensor | None,
           kwargs: dict[str, Any]) -> tuple[Any, bool, bool]:
    """Checks every patched forward makes first; returns ``_output_flags``."""
    flags = _output_flags(self.config, kwargs)
    if attention_mask is not None:
        raise ValueError("a patched model changes the token count per block, so it cannot take attention_mask")
    if self.training and any(getattr(b, "gradient_checkpointing", False) for b in _blocks(self)):
        raise ValueError("gradient checkpointing is not supported on a vitprune-patched model; "
                         "model.gradient_checkpointing_disable() first")
    _check_input(self, pixel_values, interpolate)
    return flags


def _run(self: nn.Module, x: Tensor, pixel_values: Tensor, hidden_flag: Any, want_attn: bool
         ) -> tuple[Tensor, HFBlockOps]:
    """The blocks through the engine from the embeddings ``x``: (final tokens, the ops with what they recorded)."""
    ctx: PatchContext = getattr(self, INNER_ATTR)
    _, _, patch = _patch_geometry(self)
    grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])
    state = TokenState.initial(x, _num_prefix(self), grid=grid, trace_source=ctx.trace_source)
    hidden = [x] if hidden_flag else None  # falsy (False, None, 0, []) asks for none, as in HF
    ops = _ops_class(self)(hidden, [] if want_attn else None)
    trace = Trace()
    state = run_blocks(_blocks(self), ops, state, ctx.method, trace)
    ctx.finish(state, trace)
    return state.x, ops


def _output(seq: Tensor, pooled: Tensor | None, ops: HFBlockOps, hidden_flag: Any, return_dict: bool) -> Any:
    out = BaseModelOutputWithPooling(
        last_hidden_state=seq,
        pooler_output=pooled,
        hidden_states=None if ops.hidden_states is None else _select(ops.hidden_states, hidden_flag),
        attentions=None if ops.attentions is None else tuple(ops.attentions),
    )
    return out if return_dict else out.to_tuple()


def _encoder_forward(
    self: nn.Module, pixel_values: Tensor | None, bool_masked_pos: Tensor | None, interpolate: bool,
    attention_mask: Tensor | None, kwargs: dict[str, Any],
) -> Any:
    """HF's encoder forward with the blocks run by the engine: embeddings → run_blocks → final norm (→ pooler)."""
    hidden_flag, want_attn, return_dict = _start(self, pixel_values, interpolate, attention_mask, kwargs)
    dinov2 = isinstance(self, _DINOV2)
    emb = self.embeddings
    if dinov2:
        x = emb(pixel_values, bool_masked_pos=bool_masked_pos)
    else:
        pixel_values = pixel_values.to(emb.patch_embeddings.projection.weight.dtype)
        x = emb(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate)
    seq, ops = _run(self, x, pixel_values, hidden_flag, want_attn)
    seq = self.layernorm(seq)
    if dinov2:
        pooled = seq[:, 0]
    else:
        pooled = self.pooler(seq) if self.pooler is not None else None
    return _output(seq, pooled, ops, hidden_flag, return_dict)


def _tower_forward(self: nn.Module, pixel_values: Tensor | None, interpolate: bool, kwargs: dict[str, Any]) -> Any:
    """HF's CLIP / SigLIP vision forward with the blocks run by the engine.

    CLIP: embeddings → ``pre_layrnorm`` → blocks; ``last_hidden_state`` unnormalised, the pooled CLS through
    ``post_layernorm``. SigLIP: embeddings → blocks → ``post_layernorm`` → attention-pooling head (if it has one).
    """
    hidden_flag, want_attn, return_dict = _start(self, pixel_values, interpolate, None, kwargs)
    x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    if isinstance(self, CLIPVisionModel):
        seq, ops = _run(self, self.pre_layrnorm(x), pixel_values, hidden_flag, want_attn)
        return _output(seq, self.post_layernorm(seq[:, 0]), ops, hidden_flag, return_dict)
    seq, ops = _run(self, x, pixel_values, hidden_flag, want_attn)
    seq = self.post_layernorm(seq)
    pooled = None
    if self.use_head:
        pooled = pool_reduced(seq, "map", getattr(self, INNER_ATTR), partial(siglip_head, self.head), 0)
    return _output(seq, pooled, ops, hidden_flag, return_dict)


def siglip_head(head: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """``SiglipMultiheadAttentionPoolingHead`` with an additive ``attn_mask`` [B, 1, 1, N] on the probe's logits.

    HF's head takes no mask, so with one its parts are called in its order: the probe attends over the tokens
    (``nn.MultiheadAttention``), then a residual MLP. Without one it is HF's own head.
    """
    if attn_mask is None:
        return head(x)
    b, n, _ = x.shape
    heads = head.attention.num_heads
    mask = attn_mask.expand(b, heads, 1, n).reshape(b * heads, 1, n)  # MultiheadAttention's [B·heads, L, S]
    y = head.attention(head.probe.expand(b, -1, -1), x, x, attn_mask=mask, need_weights=False)[0]
    y = y + head.mlp(head.layernorm(y))
    return y[:, 0]


def size_weighted_patch_mean(x: Tensor, size: Tensor | None, num_prefix: int, keep: Tensor | None = None) -> Tensor:
    """Mean of the patch tokens where each counts for the patches it stands for (plain mean when nothing merged);
    tokens masked out by ``keep`` [B, N] (selector training, padding) do not count."""
    if keep is not None and keep.shape[1] == x.shape[1]:
        size = keep.unsqueeze(-1) if size is None else size * keep.unsqueeze(-1)
    if size is None or size.shape[1] != x.shape[1]:
        return x[:, num_prefix:].mean(dim=1)
    w = size[:, num_prefix:].to(x.dtype)
    return (x[:, num_prefix:] * w).sum(dim=1) / w.sum(dim=1)


class PatchedMeanClassifier:
    """Mixin for the classifiers whose head reads a mean of the patch tokens: Dinov2(WithRegisters) (CLS ‖ mean),
    CLIP (mean after CLS), SigLIP (mean of all tokens). The mean is size-weighted; prefix tokens (CLS, registers)
    stay out of it, as in HF. Other keywords (``attention_mask``, ``interpolate_pos_encoding``) go to the encoder."""

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any) -> Any:
        ctx: PatchContext = getattr(self, INNER_ATTR)
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        encoder = _encoder(self)
        outputs = encoder(pixel_values, return_dict=True, **kwargs)
        seq = outputs.last_hidden_state
        features = size_weighted_patch_mean(seq, ctx.final_size, _num_prefix(encoder), ctx.final_keep)
        if isinstance(self, _DINOV2_CLASSIFIERS):
            features = torch.cat([seq[:, 0], features], dim=1)
        logits = self.classifier(features)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


PatchedDinov2Classifier = PatchedMeanClassifier  # its earlier name: patched models pickled before still load


# ---- patching ----------------------------------------------------------------------------------------------

def _encoder_mixin(encoder: nn.Module) -> type:
    if isinstance(encoder, _TOWERS):
        return PatchedHFTower
    return PatchedHFDinov2Encoder if isinstance(encoder, _DINOV2) else PatchedHFEncoder


def _swapped(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """The modules whose class is swapped, each with its mixin: the encoder, and a classifier that averages tokens."""
    hf = _hf(model)
    encoder = _encoder(hf)
    swaps = [(encoder, _encoder_mixin(encoder))]
    if isinstance(hf, _MEAN_CLASSIFIERS):
        swaps.append((hf, PatchedMeanClassifier))
    return swaps


def apply(model: nn.Module, ctx: PatchContext) -> None:
    model._vitprune = ctx
    for module, mixin in _swapped(model):
        setattr(module, INNER_ATTR, ctx)
        module.__class__ = patched_class(type(module), mixin)


def restore(model: nn.Module) -> None:
    for module, _ in _swapped(model):
        module.__class__ = original_class(type(module))
        module.__dict__.pop(INNER_ATTR, None)
    model.__class__ = model._vitprune.original_class
    del model._vitprune


register_backend("hf", is_hf_vit, sys.modules[__name__])
