"""timm ViT/DeiT/DINOv2 → transformers ViT/DeiT/Dinov2 (config + state dict), and ``hf:`` model building.

The conversion is exact (a renaming, plus splitting timm's fused ``qkv`` into ``q_proj``/``k_proj``/``v_proj``), so
a converted model computes what the timm model computes; anything HF cannot express raises a ValueError instead.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .hf import (CLASSIFIERS, SUPPORTED, CLIPModel, CLIPVisionModel, DeiTForImageClassificationWithTeacher,
                 DeiTModel, Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersModel, HFVisionModel,
                 SiglipModel, SiglipVisionModel, ViTForImageClassification, ViTModel, default_pretrained_cfg)

HF_CLASSES: dict[str, type] = {c.__name__: c for c in SUPPORTED}
_PREFIX = {"vit": "vit.", "deit": "deit.", "dinov2": "dinov2."}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def timm_family(model: nn.Module) -> str:
    """'dinov2' (LayerScale), 'deit' (distillation token) or 'vit'; raise if HF has no equivalent of the model."""
    from timm.layers import LayerScale
    from timm.layers.attention import Attention
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    problems = []
    if model.cls_token is None or getattr(model, "no_embed_class", False):
        problems.append("no class token / position embeddings without prefix slots")
    if getattr(model, "reg_token", None) is not None:
        problems.append("register tokens (HF has them in Dinov2WithRegisters; converting timm models to it is not "
                        "implemented, build it with hf:Dinov2WithRegistersModel or from its config instead)")
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        problems.append(f"global_pool={model.global_pool!r} (HF heads read the CLS token)")
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
            problems.append(f"a {name} layer")
    block = model.blocks[0]
    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        problems.append("blocks other than timm's Block/Attention/Mlp")
    else:
        attn, mlp = block.attn, block.mlp
        if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)):
            problems.append("QK-norm or extra norms inside attention/MLP")
        if getattr(attn, "gate", None) is not None:
            problems.append("gated attention")
        if type(mlp.act) is not nn.GELU or mlp.act.approximate != "none":
            problems.append(f"MLP activation {mlp.act} (HF uses exact GELU)")
        if attn.proj.bias is None or mlp.fc1.bias is None or mlp.fc2.bias is None:
            problems.append("projections without bias")
    if problems:
        raise ValueError("this timm model has no transformers equivalent: " + "; ".join(problems))
    if isinstance(block.ls1, LayerScale):
        if getattr(model, "dist_token", None) is not None:
            raise ValueError("this timm model has both LayerScale and a distillation token; HF has no such model")
        return "dinov2"
    return "deit" if getattr(model, "dist_token", None) is not None else "vit"


def hf_config_from_timm(model: nn.Module) -> Any:
    """The transformers config (ViTConfig / DeiTConfig / Dinov2Config) of a timm model's architecture."""
    from transformers import DeiTConfig, Dinov2Config, ViTConfig

    family = timm_family(model)
    block = model.blocks[0]
    size = tuple(model.patch_embed.img_size)
    patch = tuple(model.patch_embed.patch_size)
    common = dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        hidden_act="gelu",
        layer_norm_eps=model.norm.eps,
        image_size=size[0] if size[0] == size[1] else list(size),
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        num_channels=model.patch_embed.proj.in_channels,
        qkv_bias=block.attn.qkv.bias is not None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hidden = block.mlp.fc1.out_features
    if family == "dinov2":
        ratio = hidden / model.embed_dim
        return Dinov2Config(**common, mlp_ratio=int(ratio) if ratio == int(ratio) else ratio,
                            layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False)
    num_labels = model.num_classes if isinstance(model.head, nn.Linear) else 0
    cls = DeiTConfig if family == "deit" else ViTConfig
    config = cls(**common, intermediate_size=hidden)
    if num_labels:
        config.num_labels = num_labels
    return config


def timm_to_hf_state_dict(state: Mapping[str, Tensor], family: str, depth: int, prefix: str = "",
                          heads: bool = True) -> dict[str, Tensor]:
    """Rename a timm state dict to the transformers layout of ``family`` ('vit', 'deit', 'dinov2').

    ``prefix``: the encoder's attribute path inside a wrapper ('vit.', 'deit.', 'dinov2.' or '' for the encoder
    itself); ``heads``: convert ``head``/``head_dist`` into the wrapper's classifier(s) (else they are dropped).
    """
    e = prefix
    out = {
        f"{e}embeddings.cls_token": state["cls_token"],
        f"{e}embeddings.position_embeddings": state["pos_embed"],
        f"{e}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{e}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{e}layernorm.weight": state["norm.weight"],
        f"{e}layernorm.bias": state["norm.bias"],
    }
    if family == "deit":
        out[f"{e}embeddings.distillation_token"] = state["dist_token"]
    dinov2 = family == "dinov2"
    names = {"norm1": "norm1" if dinov2 else "layernorm_before", "norm2": "norm2" if dinov2 else "layernorm_after",
             "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        src, dst = f"blocks.{i}.", (f"{e}encoder.layer.{i}." if dinov2 else f"{e}layers.{i}.")
        for old, new in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{new}.{p}"] = state[f"{src}{old}.{p}"]
        for p in ("weight", "bias"):
            if f"{src}attn.qkv.{p}" in state:
                q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
                out[f"{dst}attention.q_proj.{p}"] = q
                out[f"{dst}attention.k_proj.{p}"] = k
                out[f"{dst}attention.v_proj.{p}"] = v
        if dinov2:
            out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
            out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    if heads and "head.weight" in state:
        head = "cls_classifier" if family == "deit" else "classifier"
        out[f"{head}.weight"], out[f"{head}.bias"] = state["head.weight"], state["head.bias"]
        if family == "deit":
            out["distillation_classifier.weight"] = state["head_dist.weight"]
            out["distillation_classifier.bias"] = state["head_dist.bias"]
    return {k: v.clone() for k, v in out.items()}


def hf_from_timm(model: nn.Module, hf_class: str | type | None = None) -> nn.Module:
    """A transformers model (eval mode) with the weights of a timm ViT/DeiT/DINOv2, loaded strictly.

    ``hf_class`` defaults to the class that keeps everything: ViTForImageClassification (ViTModel without a head),
    DeiTForImageClassificationWithTeacher, Dinov2Model. An encoder class drops the timm head.
    """
    family = timm_family(model)
    config = hf_config_from_timm(model)
    has_head = isinstance(model.head, nn.Linear)
    default = {"vit": ViTForImageClassification if has_head else ViTModel,
               "deit": DeiTForImageClassificationWithTeacher if has_head else DeiTModel, "dinov2": Dinov2Model}[family]
    cls = HF_CLASSES.get(hf_class, hf_class) if isinstance(hf_class, str) else (hf_class or default)
    allowed = {"vit": (ViTModel, ViTForImageClassification), "dinov2": (Dinov2Model,),
               "deit": (DeiTModel, DeiTForImageClassificationWithTeacher)}[family]
    if cls not in allowed:
        raise ValueError(
            f"a timm {family} model converts to {' or '.join(c.__name__ for c in allowed)}, not {cls!r}"
            + (" (Dinov2ForImageClassification's head reads CLS ‖ mean of patches, which a timm head does not)"
               if cls is Dinov2ForImageClassification else "")
        )
    if cls in CLASSIFIERS and not has_head:
        raise ValueError(f"{cls.__name__} needs the timm model's classifier head; this one has num_classes=0")
    with torch.device("meta"):  # every tensor comes from the timm model: skip HF's (slow) random init
        hf = cls(config, add_pooling_layer=False) if cls in (ViTModel, DeiTModel) else cls(config)
    prefix = "" if cls in (ViTModel, DeiTModel, Dinov2Model) else _PREFIX[family]
    state = timm_to_hf_state_dict(model.state_dict(), family, len(model.blocks), prefix, heads=bool(prefix))
    own = hf.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:  # a bug in the mapping, never a user error: say exactly what
        raise ValueError(f"timm → {cls.__name__} conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.load_state_dict(state, strict=True, assign=True)  # assign: tensors keep the timm model's dtype
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:  # a parameter or buffer the mapping does not know: never hand out an unloaded model
        raise ValueError(f"timm → {cls.__name__} conversion left {left[:5]} unset")
    return hf.eval()


# ---- building models by name for the tools (``vitprune.models.create_model("hf:...")``) ----------------------

def create_hf_model(spec: str, *, checkpoint: str | Path | None = None, pretrained: bool = False,
                    shared_weights: bool = True, **kwargs: Any) -> HFVisionModel:
    """Build an ``HFVisionModel`` (eval mode) from what follows ``hf:``.

    - a path to a ``config.json`` (random init) or to a folder saved with ``save_pretrained`` (its weights);
    - a transformers class name (``ViTForImageClassification``, ``Dinov2Model``, ...): random init from that
      family's default config, updated by ``kwargs`` (e.g. ``hidden_size=192``);
    - any other name vitprune.models knows (``dinov2_vits14``, ``testbed``, a timm name): built with timm (shared
      weights, ``checkpoint`` or ``pretrained`` as usual) and converted to transformers.

    ``checkpoint`` is loaded strictly in the layout of the model built first: transformers keys for the first two
    forms, timm keys for the last.
    """
    from ..models import create_model, load_checkpoint

    path = Path(spec).expanduser()
    if path.exists():
        if pretrained:
            raise ValueError("--pretrained reads timm's hub; for hf:<path> the weights come from the folder itself")
        hf, cfg = _load_local(path, **kwargs)
    elif spec in HF_CLASSES:
        if pretrained:
            raise ValueError(f"hf:{spec} is random init; for pretrained weights save them with save_pretrained and "
                             "pass hf:<that folder>, or use hf:<timm name> --pretrained")
        hf, cfg = _from_default_config(HF_CLASSES[spec], **kwargs), None
    else:
        _check_known_name(spec)
        timm_model = create_model(spec, checkpoint=checkpoint, pretrained=pretrained, shared_weights=shared_weights,
                                  **kwargs)
        hf = hf_from_timm(timm_model)
        return HFVisionModel(hf, {**timm_model.pretrained_cfg, "architecture": f"hf:{spec}"}).eval()
    if checkpoint is not None:
        load_checkpoint(hf, checkpoint)
    return HFVisionModel(hf, cfg).eval()


def _check_known_name(spec: str) -> None:
    import timm

    from ..models import DINOV2_NAMES, TESTBED_NAMES

    if spec.lower() not in TESTBED_NAMES + DINOV2_NAMES and not timm.is_model(spec):
        raise ValueError(
            f"hf:{spec} is neither an existing path, a transformers class ({', '.join(HF_CLASSES)}), nor a model "
            "vitprune or timm knows (e.g. dinov2_vits14, testbed, deit_small_patch16_224); "
            "use hf:<path to config.json or a save_pretrained folder> for your own configuration"
        )


def _from_default_config(cls: type, **overrides: Any) -> nn.Module:
    config = cls.config_class(**overrides)
    return cls(config)


def _class_for(config: Any) -> type:
    """The supported class the config names in ``architectures``, else the family's encoder."""
    for name in getattr(config, "architectures", None) or []:
        if name in HF_CLASSES:
            return HF_CLASSES[name]
    by_type = {"vit": ViTModel, "deit": DeiTModel, "dinov2": Dinov2Model, "dinov2_with_registers":
               Dinov2WithRegistersModel, "clip_vision_model": CLIPVisionModel, "clip": CLIPModel,
               "siglip_vision_model": SiglipVisionModel, "siglip": SiglipModel}
    if config.model_type not in by_type:
        raise ValueError(f"config model_type {config.model_type!r} is not one vitprune patches "
                         f"(supported: {', '.join(by_type)})")
    return by_type[config.model_type]


def _load_local(path: Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    from transformers import AutoConfig

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass a folder saved with save_pretrained, or a config.json")
    config = AutoConfig.from_pretrained(str(folder if path.is_dir() else path), local_files_only=True, **overrides)
    cls = _class_for(config)
    if path.is_dir():
        if not any((path / f).is_file() for f in _WEIGHT_FILES):
            raise ValueError(f"{path} holds no weights ({', '.join(_WEIGHT_FILES)}); pass its config.json for a "
                             "random-init model, or save the model with save_pretrained")
        hf = cls.from_pretrained(str(path), config=config, local_files_only=True)
    else:
        hf = cls(config)
    return hf, _preprocessing(folder, hf)


def _preprocessing(folder: Path, hf: nn.Module) -> dict[str, Any]:
    """Defaults for the family, with mean/std from a ``preprocessor_config.json`` beside the config if present."""
    cfg = default_pretrained_cfg(hf)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        c = cfg["input_size"][0]
        if "image_mean" in data and "image_std" in data:
            cfg["mean"], cfg["std"] = tuple(data["image_mean"])[:c], tuple(data["image_std"])[:c]
    return cfg


__all__ = ["HF_CLASSES", "create_hf_model", "hf_config_from_timm", "hf_from_timm", "timm_family",
           "timm_to_hf_state_dict"]

