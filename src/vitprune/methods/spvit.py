"""SPViT (Kong et al., ECCV 2022): the multi-head selector before blocks 3, 6, 9 of a 12-block ViT, a new package
token appended per stage, trained to the keep ratios ρ = [0.617, 0.369, 0.137] (the paper's DeiT-S setting,
fractions of the original patch tokens). On timm Swin-T/S, with neither ``keep`` nor ``blocks`` given, the defaults
hit SPViT's Swin budgets instead (``selector.STRUCTURE_DEFAULTS``). All logic is in ``selector.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from ..registry import register_method
from .selector import TokenSelector


@register_method("spvit")
@dataclass
class SPViT(TokenSelector):
    """``vitprune.patch(model, "spvit", keep=(0.617, 0.369, 0.137), blocks=(3, 6, 9))``."""

    keep: float | Sequence[float] = (0.617, 0.369, 0.137)
    package: str = "append"
    default_blocks_12: ClassVar[tuple[int, ...]] = (3, 6, 9)
