"""Built-in token-reduction methods; importing this package registers them."""
from .base import ModelInfo, TokenReducer
from .evit import EViT
from .tome import ToMe

__all__ = ["ModelInfo", "TokenReducer", "ToMe", "EViT"]
