"""vitprune: token reduction for Vision Transformers, one API over ToMe, EViT, PPT, ViT-ToGo and learned selectors.

    import timm, vitprune
    model = timm.create_model("deit_small_patch16_224")
    vitprune.patch(model, "tome", r=13)      # in place; returns the model
    vitprune.count_macs(model, torch.randn(1, 3, 224, 224)).gmacs   # from the executed ops
    vitprune.unpatch(model)                   # exactly the original again
    model = vitprune.load("testbed", "results/train/heatvit")   # base weights + a `vitprune train` folder
"""
from .measure.flops import MacsCount, UncountedOpError, count_macs
from .methods.base import ModelInfo, TokenReducer, Trace
from .patching import is_patched, last_trace, patch, unpatch
from .registry import available_backends, available_methods, create_method, register_backend, register_method
from .tokens import TokenState
from .train.checkpoint import load

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "available_methods",
    "create_method",
    "register_method",
    "register_backend",
    "available_backends",
    "TokenReducer",
    "TokenState",
    "ModelInfo",
    "Trace",
    "last_trace",
    "load",
    "count_macs",
    "MacsCount",
    "UncountedOpError",
]

