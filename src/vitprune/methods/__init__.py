"""Built-in token-reduction methods: one module per method, each registering itself on import.

Every module in this package is imported here, so adding a method is adding a file.
"""
import importlib
import pkgutil

from .base import ModelInfo, TokenReducer

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ModelInfo", "TokenReducer"]
