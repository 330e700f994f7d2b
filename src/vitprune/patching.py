"""``patch`` / ``unpatch``: validate everything first, then swap the model's class; never leave a half-patched model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engine import PatchContext
from .methods.base import TokenReducer
from .registry import create_method


def _backend(model: nn.Module):
    from .backends import timm as timm_backend

    if timm_backend.is_timm_vit(model):
        return timm_backend
    raise ValueError(
        f"unsupported model type {type(model).__module__}.{type(model).__name__}; vitprune patches timm "
        "VisionTransformer models (ViT, DeiT, distilled DeiT, DINOv2), e.g. timm.create_model('deit_small_patch16_224')"
    )


def first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first parameter/buffer holding NaN or Inf, if any."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
    return None


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_vitprune", None), PatchContext)


def patch(model: nn.Module, method: str | TokenReducer, *, trace_source: bool = False, **config: Any) -> nn.Module:
    """Patch ``model`` in place with a token-reduction method and return it.

    ``method`` is a registered name (see ``available_methods()``) with its keywords, e.g.
    ``patch(m, "tome", r=13)`` or ``patch(m, "evit", keep=0.7, blocks=(3, 6, 9))``, or a method object.
    ``trace_source=True`` tracks which input patches each token holds (for pictures; costs memory).
    A model that is already patched is re-patched with the new method. On any error the model is untouched.
    """
    backend = _backend(model)
    original_class = model._vitprune.original_class if is_patched(model) else type(model)
    if isinstance(method, TokenReducer):
        if config:
            raise ValueError("pass either a method object or a method name with keywords, not both")
        reducer = method
    else:
        reducer = create_method(method, **config)
    backend.check_supported(model)
    info = backend.model_info(model)
    reducer.setup(info)
    bad = first_nonfinite(model)
    if bad is not None:
        raise ValueError(f"parameter {bad!r} holds NaN/Inf values; reload a valid checkpoint before patching")
    if is_patched(model):
        backend.restore(model)
    backend.apply(model, PatchContext(reducer, info, original_class, trace_source))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model to exactly what it was (same class, same parameters); returns it."""
    if not is_patched(model):
        raise ValueError("model is not patched by vitprune; nothing to unpatch")
    _backend(model).restore(model)
    return model


def last_trace(model: nn.Module):
    """Tokens per block (and method notes) recorded by the last forward of a patched model."""
    if not is_patched(model):
        raise ValueError("model is not patched by vitprune")
    return model._vitprune.last_trace
