"""HeatViT (Dong et al., HPCA 2023): SPViT's multi-head selector before blocks 4, 7, 10 of a 12-block ViT, one
package token that each stage's dropped tokens are added to, and the keep rule "keep probability ≥ 0.5"
(``mode="adaptive"``; ``mode="fixed"`` keeps a fixed count per block instead). On timm Swin-T/S, with
neither ``keep`` nor ``blocks`` given, the schedule is SPViT's Swin one (``selector.STRUCTURE_DEFAULTS``). All logic
is in ``selector.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from ..registry import register_method
from .selector import TokenSelector


@register_method("heatvit")
@dataclass
class HeatViT(TokenSelector):
    """``vitprune.patch(model, "heatvit", keep=(0.7, 0.49, 0.343), blocks=(4, 7, 10), mode="fixed")``."""

    keep: float | Sequence[float] = (0.7, 0.49, 0.343)
    package: str = "update"
    default_blocks_12: ClassVar[tuple[int, ...]] = (4, 7, 10)
