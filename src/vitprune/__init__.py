"""vitprune: token reduction for Vision Transformers, one API over ToMe, EViT, PPT, ViT-ToGo and learned selectors.

    import timm, vitprune
    model = timm.create_model("deit_small_patch16_224")
    vitprune.patch(model, "tome", r=13)      # in place; returns the model
    vitprune.unpatch(model)                   # exactly the original again
"""
from .methods.base import ModelInfo, TokenReducer, Trace
from .patching import is_patched, patch, unpatch
from .registry import available_methods, create_method, register_method
from .tokens import TokenState

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "available_methods",
    "create_method",
    "register_method",
    "TokenReducer",
    "TokenState",
    "ModelInfo",
    "Trace",
    "last_trace",
]


def last_trace(model):
    """Tokens per block (and method notes) recorded by the last forward of a patched model."""
    if not is_patched(model):
        raise ValueError("model is not patched by vitprune")
    return model._vitprune.last_trace
