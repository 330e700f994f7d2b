"""``patch`` / ``unpatch``: validate everything first, then swap the model's class; never leave a half-patched model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine import PatchContext
from .methods.base import TokenReducer
from .registry import create_method, find_backend


def _backend(model: nn.Module):
    backend = find_backend(model)
    if backend is not None:
        return backend
    _reject_windowed(model)
    raise ValueError(
        f"unsupported model type {type(model).__module__}.{type(model).__name__}; vitprune patches timm "
        "VisionTransformer models (ViT, DeiT, DINOv2, CLIP, SigLIP; e.g. timm.create_model('deit_small_patch16_224')), "
        "timm Eva models (EVA02, DINOv3, RoPE ViTs), timm PoolingVisionTransformer (PiT; spvit/heatvit only), "
        "timm SwinTransformer (Swin; spvit/heatvit only), "
        "open_clip image towers (clip.visual; pip install 'vitprune[open_clip]'), and Hugging Face transformers "
        "ViT/DeiT/Dinov2/Dinov2WithRegisters models and classifiers, CLIPVisionModel(WithProjection), "
        "SiglipVisionModel, CLIPModel/SiglipModel (their vision tower) (pip install 'vitprune[hf]')"
    )


def _reject_windowed(model: nn.Module) -> None:
    """Swin variants without a backend: say why and what runs, instead of 'unsupported type'."""
    swin = ("SwinTransformerV2", "SwinTransformerV2Cr", "SwinModel", "Swinv2Model", "SwinForImageClassification",
            "Swinv2ForImageClassification")
    if not any(type(m).__name__ in swin for m in (model, *model.children())):
        return
    raise ValueError(
        f"{type(model).__name__} (Swin V2 / Hugging Face Swin) cannot be token-reduced by vitprune: windowed "
        "attention needs every token back on the full grid of windows (7x7, shifted by half a window every other "
        "block) and patch merging pools 2x2 neighbours, so each Swin implementation needs a backend that scatters "
        "the kept tokens onto that grid, and only timm's Swin (v1) has one. Use timm's SwinTransformer "
        "(e.g. timm.create_model('swin_tiny_patch4_window7_224'); spvit, heatvit), a PiT (pit_ti/xs/s_224: spvit, "
        "heatvit) or a plain ViT/DeiT (all methods)"
    )


def first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first parameter/buffer holding NaN or Inf, if any."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
    return None


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(_feature_target(model), "_vitprune", None), PatchContext)


def patch(model: nn.Module, method: str | Path | TokenReducer, *, trace_source: bool = False, **config: Any) -> nn.Module:
    """Patch ``model`` in place with a token-reduction method and return it.

    ``method`` is a registered name (see ``available_methods()``) with its keywords, e.g.
    ``patch(m, "tome", r=13)`` or ``patch(m, "evit", keep=0.7, blocks=(3, 6, 9))``, or a method object.
    ``method`` may also be the path of a recipe written by ``vitprune tune`` (a path ending in ``.json``): its method
    and config are applied.
    ``trace_source=True`` tracks which input patches each token holds (for pictures; costs memory).
    A model that is already patched is re-patched with the new method. On any error the model is untouched.
    """
    wrapper, model = model, _feature_target(model)
    backend = _backend(model)
    original_class = model._vitprune.original_class if is_patched(model) else type(model)
    if isinstance(method, (str, Path)) and str(method).endswith(".json"):
        if config:
            raise ValueError("a recipe fixes the method's config; pass the recipe alone, or a method name with keywords")
        from .tune import read_recipe

        method, config = read_recipe(method)
    if isinstance(method, TokenReducer):
        if config:
            raise ValueError("pass either a method object or a method name with keywords, not both")
        reducer = method
    else:
        reducer = create_method(method, **config)
    backend.check_supported(model)
    if hasattr(backend, "check_method"):  # e.g. PiT runs only the methods that understand stages
        backend.check_method(model, reducer)
    info = backend.model_info(model)
    reducer.setup(info)
    bad = first_nonfinite(model)
    if bad is not None:
        raise ValueError(f"parameter {bad!r} holds NaN/Inf values; reload a valid checkpoint before patching")
    if is_patched(model):
        _detach_method_module(model)
        backend.restore(model)
    backend.apply(model, PatchContext(reducer, info, original_class, trace_source))
    _attach_method_module(model, reducer)
    return wrapper


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model to exactly what it was (same class, same parameters); returns it."""
    wrapper, model = model, _feature_target(model)
    if not is_patched(model):
        raise ValueError("model is not patched by vitprune; nothing to unpatch")
    _detach_method_module(model)
    _backend(model).restore(model)
    return wrapper


def _feature_target(model: nn.Module) -> nn.Module:
    """The model inside timm's ``features_only`` wrapper (``FeatureGetterNet`` calls its ``forward_intermediates``),
    so ``patch(timm.create_model(name, features_only=True), ...)`` patches what actually runs."""
    if type(model).__name__ == "FeatureGetterNet" and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return model


# ---- methods with parameters (e.g. ToGo's learned head-importance estimator) --------------------------------
# A method that owns trainable parameters exposes them as ``reducer.module`` (an ``nn.Module``, or None). While the
# model is patched that module is a submodule named METHOD_MODULE, so ``model.parameters()``, ``state_dict()``,
# ``.to()``, ``.train()`` see it; ``unpatch`` (and re-patching) removes it again.
METHOD_MODULE = "vitprune_method"


def _attach_method_module(model: nn.Module, reducer: TokenReducer) -> None:
    module = getattr(reducer, "module", None)
    if module is None:
        return
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    module.train(model.training)
    model.add_module(METHOD_MODULE, module)


def _detach_method_module(model: nn.Module) -> None:
    model._modules.pop(METHOD_MODULE, None)


def last_trace(model: nn.Module):
    """Tokens per block (and method notes) recorded by the last forward of a patched model."""
    if not is_patched(model):
        raise ValueError("model is not patched by vitprune")
    return _feature_target(model)._vitprune.last_trace
