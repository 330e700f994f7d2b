"""Hugging Face transformers backend: a thin class swap of ``ViTModel`` / ``DeiTModel`` / ``Dinov2Model``.

Like the timm backend, only classes change: the encoder model (found inside ``*ForImageClassification`` wrappers
too) gets a ``forward`` that runs its layers through the shared engine with the shared attention (``attend``: SDPA
with the log(size) bias). Parameters, buffers and submodules are never touched, so ``unpatch`` is exact.

The wrappers' own heads read only prefix tokens (CLS, DeiT's distillation token), which no method reduces, so they
stay as they are. ``Dinov2ForImageClassification`` also averages the patch tokens; its class is swapped too, so the
average counts each token for the patches it stands for (as the timm backend's ``avg`` pool does).

Once tokens are reduced, HF's per-layer outputs change meaning:

- ``output_hidden_states``: ``depth + 1`` tensors, the embeddings and then each block's output, each with the token
  count it had after that block's reduction (``last_trace(model).tokens_mlp``), prefix tokens first.
- ``output_attentions``: per block the attention probabilities the block used, ``[B, heads, N_l, N_l]`` over the
  tokens entering it (``tokens_attn``), size bias (and selector mask) included. SDPA never materialises them, so they
  are computed on the side only when asked for, whatever ``attn_implementation`` says.
"""
from __future__ import annotations

import sys

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

try:
    from transformers import (DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel,
                              Dinov2ForImageClassification, Dinov2Model, PreTrainedModel, ViTForImageClassification,
                              ViTModel)
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
    from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTPreTrainedModel
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer, Dinov2PreTrainedModel
    from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTPreTrainedModel
except ImportError as e:  # pragma: no cover
    raise ImportError("vitprune's Hugging Face backend needs transformers: pip install 'vitprune[hf]'") from e

ENCODERS: tuple[type, ...] = (ViTModel, DeiTModel, Dinov2Model)
CLASSIFIERS: tuple[type, ...] = (
    ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
)
SUPPORTED = ENCODERS + CLASSIFIERS
_FAMILY_TYPES = (ViTPreTrainedModel, DeiTPreTrainedModel, Dinov2PreTrainedModel)
_LAYERS = {ViTModel: (ViTLayer, ViTAttention), DeiTModel: (DeiTLayer, DeiTAttention),
           Dinov2Model: (Dinov2Layer, Dinov2Attention)}
# kwargs HF wrappers may pass down that do not change the encoder's result (the loss's normaliser, a cache flag)
_HARMLESS_KWARGS = ("num_items_in_batch", "use_cache")
INNER_ATTR = "_vitprune_inner"  # the PatchContext on every swapped module (the top model also has ``_vitprune``)


# ---- running a block ---------------------------------------------------------------------------------------

class HFBlockOps:
    """Runs the parts of a transformers ViT/DeiT/Dinov2 layer; optionally records per-block outputs.

    ``hidden_states``/``attentions``: lists to append each block's output / attention probabilities to (for
    ``output_hidden_states``/``output_attentions``), or None. The shared instances below record nothing.
    """

    def __init__(self, hidden_states: list[Tensor] | None = None, attentions: list[Tensor] | None = None) -> None:
        self.hidden_states = hidden_states
        self.attentions = attentions

    def norm1(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.layernorm_before(x)

    def attention(
        self, block: nn.Module, h: Tensor, size: Tensor | None, keep: Tensor | None = None
    ) -> tuple[Tensor, AttentionScores]:
        attn = block.attention
        b, n, _ = h.shape

        def heads(layer: nn.Module) -> Tensor:
            return layer(h).view(b, n, -1, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
        exp = getattr(attn, EXP_ATTR, None)
        dropout = attn.attention_dropout if attn.training else 0.0
        out, scores = attend(q, k, v, scale=attn.scaling, size=size, keep=keep, exp=exp, dropout_p=dropout)
        if self.attentions is not None:
            logits = (q * attn.scaling) @ k.transpose(-2, -1)
            if scores.bias is not None:
                logits = logits + scores.bias
            self.attentions.append(masked_softmax(logits, scores.keep, exp or torch.exp).to(q.dtype))
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)), scores

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


def _ops_class(encoder: nn.Module) -> type[HFBlockOps]:
    return HFDinov2BlockOps if isinstance(encoder, Dinov2Model) else HFBlockOps


# ---- finding the parts of a model --------------------------------------------------------------------------

class HFVisionModel(nn.Module):
    """A transformers model seen as vitprune's tools (bench, viz) see timm models: images in, one tensor out.

    ``forward`` returns the logits of a ``*ForImageClassification`` model, or the CLS feature after the final norm
    (timm's ``num_classes=0`` output) of an encoder. ``patch_embed``, ``blocks``, ``num_prefix_tokens`` and
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
        out = self.hf(pixel_values=x, return_dict=True, **kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]

    @property
    def encoder_model(self) -> nn.Module:
        return _encoder(self.hf)

    @property
    def patch_embed(self) -> SimpleNamespace:
        pe = self.encoder_model.embeddings.patch_embeddings
        size = tuple(pe.image_size)
        grid = (size[0] // pe.patch_size[0], size[1] // pe.patch_size[1])
        return SimpleNamespace(proj=pe.projection, img_size=size, grid_size=grid, num_patches=grid[0] * grid[1],
                               patch_size=tuple(pe.patch_size), strict_img_size=True)

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


def default_pretrained_cfg(hf: nn.Module) -> dict[str, Any]:
    """timm-style preprocessing defaults for a transformers model: the input size it was built for and the
    normalisation HF's own image processors use for the family (ViT 0.5/0.5; DeiT, Dinov2 ImageNet; resize 256 and
    centre-crop 224 except ViT, which resizes straight to the input size)."""
    cfg = _encoder(hf).config
    size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
    c = cfg.num_channels
    vit = isinstance(hf, ViTPreTrainedModel)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if vit else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return dict(architecture=type(hf).__name__, input_size=(c, *size), interpolation="bilinear" if vit else "bicubic",
                crop_pct=1.0 if vit else 224 / 256, crop_mode="center", mean=mean[:c], std=std[:c],
                num_classes=hf.config.num_labels if isinstance(hf, CLASSIFIERS) else 0)


def _hf(model: nn.Module) -> nn.Module:
    return model.hf if isinstance(model, HFVisionModel) else model


def _encoder(hf: nn.Module) -> nn.Module:
    return hf.base_model if isinstance(hf, PreTrainedModel) else hf


def _blocks(encoder: nn.Module) -> nn.ModuleList:
    return encoder.encoder.layer if isinstance(encoder, Dinov2Model) else encoder.layers


def _num_prefix(encoder: nn.Module) -> int:
    return 2 if isinstance(encoder, DeiTModel) else 1


def is_hf_vit(model: nn.Module) -> bool:
    """A transformers ViT/DeiT/Dinov2 model (supported or not: ``check_supported`` says why not), or the adapter."""
    return isinstance(model, HFVisionModel) or isinstance(model, _FAMILY_TYPES)


def check_supported(model: nn.Module) -> None:
    """Raise one ValueError listing why this transformers model cannot be patched (if it cannot)."""
    hf = _hf(model)
    top = original_class(type(hf))
    if not issubclass(top, SUPPORTED):
        raise ValueError(
            f"cannot patch {top.__name__}: supported transformers classes are "
            f"{', '.join(c.__name__ for c in SUPPORTED)}. Masked-image-modeling and backbone classes reshape the "
            "tokens into the patch grid, which token reduction breaks; patch the encoder (e.g. model.vit) instead."
        )
    encoder = _encoder(hf)
    if getattr(model, "_vitprune", None) is None and any(hasattr(m, INNER_ATTR) for m in (hf, encoder)):
        raise ValueError("this model is part of a model that vitprune already patched; unpatch that model first")
    problems = []
    layer_cls, attn_cls = next(v for c, v in _LAYERS.items() if isinstance(encoder, c))
    try:
        blocks = _blocks(encoder)
    except AttributeError:
        blocks = None
    if blocks is None:
        problems.append("its layers are not where transformers 5 keeps them (model.layers / model.encoder.layer)")
    else:
        for i, block in enumerate(blocks):
            if type(block) is not layer_cls:
                problems.append(f"layer {i} is {type(block).__name__} (expected {layer_cls.__name__})")
                break
            attn = block.attention
            if type(attn) is not attn_cls or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                problems.append(f"layer {i} attention is {type(attn).__name__} without q_proj/k_proj/v_proj/o_proj")
                break
    if problems:
        raise ValueError(
            f"cannot patch {top.__name__}: " + "; ".join(problems)
            + ". vitprune's HF backend follows the transformers 5 layout (tested with 5.23); upgrade transformers."
        )


def model_info(model: nn.Module) -> ModelInfo:
    hf = _hf(model)
    encoder = _encoder(hf)
    cfg = encoder.config
    pe = encoder.embeddings.patch_embeddings
    grid = (pe.image_size[0] // pe.patch_size[0], pe.image_size[1] // pe.patch_size[1])
    block = _blocks(encoder)[0]
    mlp = block.mlp
    # MACs per token are 2·ratio·C²; SwiGLU has three C×h matrices, so its equivalent ratio is 1.5·h/C
    hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 1.5 * mlp.down_proj.in_features
    return ModelInfo(
        depth=len(_blocks(encoder)),
        dim=cfg.hidden_size,
        num_heads=block.attention.num_attention_heads,
        num_prefix=_num_prefix(encoder),
        grid=grid,
        mlp_ratio=hidden / cfg.hidden_size,
        has_cls=True,
        patch_embed_macs=grid[0] * grid[1] * pe.projection.weight[0].numel() * cfg.hidden_size,
        head_macs=_head_macs(hf, encoder),
    )


def _head_macs(hf: nn.Module, encoder: nn.Module) -> int:
    heads = [getattr(hf, n, None) for n in ("classifier", "cls_classifier", "distillation_classifier")]
    pooler = getattr(encoder, "pooler", None)
    heads.append(getattr(pooler, "dense", None))
    return sum(h.weight.numel() for h in heads if isinstance(h, nn.Linear))


# ---- the patched forwards ----------------------------------------------------------------------------------

def _check_input(encoder: nn.Module, x: Tensor | None, interpolate: bool) -> None:
    if x is None:
        raise ValueError("pass the images as pixel_values, a [B, C, H, W] tensor")
    if x.dim() != 4:
        raise ValueError(f"expected images as a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    pe = encoder.embeddings.patch_embeddings
    if x.shape[1] != pe.num_channels:
        raise ValueError(f"model expects {pe.num_channels} input channel(s), got {x.shape[1]}; convert the images first")
    size, patch = tuple(pe.image_size), tuple(pe.patch_size)
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
    """Mixin placed in front of ``Dinov2Model`` (same signature as its own: no ``interpolate_pos_encoding``, since
    Dinov2 always resamples its position embeddings; the keyword is accepted and has nothing to change)."""

    def forward(
        self,
        pixel_values: Tensor | None = None,
        bool_masked_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("interpolate_pos_encoding", None)
        return _encoder_forward(self, pixel_values, bool_masked_pos, True, attention_mask, kwargs)


def _encoder_forward(
    self: nn.Module, pixel_values: Tensor | None, bool_masked_pos: Tensor | None, interpolate: bool,
    attention_mask: Tensor | None, kwargs: dict[str, Any],
) -> Any:
    """HF's encoder forward with the blocks run by the engine: embeddings → run_blocks → final norm (→ pooler)."""
    ctx: PatchContext = getattr(self, INNER_ATTR)
    hidden_flag, want_attn, return_dict = _output_flags(self.config, kwargs)
    if attention_mask is not None:
        raise ValueError("a patched model changes the token count per block, so it cannot take attention_mask")
    blocks = _blocks(self)
    if self.training and any(getattr(b, "gradient_checkpointing", False) for b in blocks):
        raise ValueError("gradient checkpointing is not supported on a vitprune-patched model; "
                         "model.gradient_checkpointing_disable() first")
    dinov2 = isinstance(self, Dinov2Model)
    _check_input(self, pixel_values, interpolate)
    emb = self.embeddings
    if dinov2:
        x = emb(pixel_values, bool_masked_pos=bool_masked_pos)
    else:
        pixel_values = pixel_values.to(emb.patch_embeddings.projection.weight.dtype)
        x = emb(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate)
    patch = emb.patch_embeddings.patch_size
    grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])
    state = TokenState.initial(x, _num_prefix(self), grid=grid, trace_source=ctx.trace_source)
    hidden = [x] if hidden_flag else None  # falsy (False, None, 0, []) asks for none, as in HF
    ops = _ops_class(self)(hidden, [] if want_attn else None)
    trace = Trace()
    state = run_blocks(blocks, ops, state, ctx.method, trace)
    ctx.finish(state, trace)
    seq = self.layernorm(state.x)
    if dinov2:
        pooled = seq[:, 0]
    else:
        pooled = self.pooler(seq) if self.pooler is not None else None
    out = BaseModelOutputWithPooling(
        last_hidden_state=seq,
        pooler_output=pooled,
        hidden_states=None if hidden is None else _select(hidden, hidden_flag),
        attentions=None if not want_attn else tuple(ops.attentions),
    )
    return out if return_dict else out.to_tuple()


def size_weighted_patch_mean(x: Tensor, size: Tensor | None, num_prefix: int, keep: Tensor | None = None) -> Tensor:
    """Mean of the patch tokens where each counts for the patches it stands for (plain mean when nothing merged);
    tokens masked out by ``keep`` [B, N] (selector training, padding) do not count."""
    if keep is not None and keep.shape[1] == x.shape[1]:
        size = keep.unsqueeze(-1) if size is None else size * keep.unsqueeze(-1)
    if size is None or size.shape[1] != x.shape[1]:
        return x[:, num_prefix:].mean(dim=1)
    w = size[:, num_prefix:].to(x.dtype)
    return (x[:, num_prefix:] * w).sum(dim=1) / w.sum(dim=1)


class PatchedDinov2Classifier:
    """Mixin for ``Dinov2ForImageClassification``: its head reads CLS ‖ mean(patch tokens); the mean is size-weighted."""

    def forward(
        self, pixel_values: Tensor | None = None, labels: Tensor | None = None,
        attention_mask: Tensor | None = None, **kwargs: Any,
    ) -> Any:
        ctx: PatchContext = getattr(self, INNER_ATTR)
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        outputs = self.dinov2(pixel_values, attention_mask=attention_mask, return_dict=True, **kwargs)
        seq = outputs.last_hidden_state
        features = torch.cat([seq[:, 0], size_weighted_patch_mean(seq, ctx.final_size, 1, getattr(ctx, "final_keep", None))], dim=1)
        logits = self.classifier(features)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


# ---- patching ----------------------------------------------------------------------------------------------

def _swapped(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """The modules whose class is swapped, each with its mixin: the encoder, and a Dinov2 classifier."""
    hf = _hf(model)
    encoder = _encoder(hf)
    swaps = [(encoder, PatchedHFDinov2Encoder if isinstance(encoder, Dinov2Model) else PatchedHFEncoder)]
    if isinstance(hf, Dinov2ForImageClassification):
        swaps.append((hf, PatchedDinov2Classifier))
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
