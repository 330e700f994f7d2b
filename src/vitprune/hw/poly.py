"""Integer-friendly polynomial non-linearities (I-BERT style, as used by HeatViT).

Pure functions (``poly_erf``, ``poly_gelu``, ``poly_exp``, ``poly_softmax``) and drop-in modules
(``PolyGELU``, ``PolySoftmax``). They are evaluated in floating point here; every step maps onto integer
hardware: a clamp, one square, multiply-adds with constants, a floor of ``-x / ln2`` and a right shift by ``z``.

Measured max abs errors (float64 reference, dense grids; see ``tests/test_hw_poly.py``):

* ``poly_erf``  vs ``erf``          on [-8, 8]: 9.63e-2, at u -> 0 (L jumps to ±0.0963 there; exact ±1 for |u| >= 1.769)
* ``poly_gelu`` vs exact ``GELU``   on [-8, 8]: 1.82e-2 (at x ~ 2.35; the erf jump at 0 is cancelled by x)
* ``poly_exp``  vs ``exp``          on [-20, 0]: 2.13e-3 (at x ~ -0.138); relative error <= 3.1e-3
* ``poly_softmax`` vs ``softmax`` on rows of the testbed's real attention logits
  (16 images, all 12 blocks, 3 heads): 7.9e-4 per probability

``poly_exp`` is monotone within each segment p in (-ln2, 0]; at a segment edge x = -k·ln2 the stated
coefficients leave a downward step of 4.4e-5·2^-k (poly(-ln2) = 0.500093 < poly(0) / 2 = 0.500137), so the
function is monotone up to a relative 8e-5 — the property of the I-BERT coefficients, kept as published.

Not done here: LayerNorm's integer 1/sqrt (I-BERT's Newton iteration) — LayerNorm stays float.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ERF_A = -0.2888
ERF_B = -1.769
EXP_A = 0.3585
EXP_B = 1.353
EXP_C = 0.344
LN2 = math.log(2.0)
_SQRT1_2 = 1.0 / math.sqrt(2.0)


def poly_erf(u: Tensor) -> Tensor:
    """L(u) = sgn(u)·[a·(min(|u|, -b) + b)² + 1], a = -0.2888, b = -1.769 (I-BERT's i-erf)."""
    t = torch.clamp(u.abs(), max=-ERF_B) + ERF_B
    return torch.sign(u) * (ERF_A * t * t + 1.0)


def poly_gelu(x: Tensor) -> Tensor:
    """GELU(x) ≈ x/2·(1 + L(x/√2)); max abs error 1.82e-2 on [-8, 8] (exact beyond |x| >= 2.502)."""
    return 0.5 * x * (1.0 + poly_erf(x * _SQRT1_2))


def _exp_poly(p: Tensor) -> Tensor:
    return EXP_A * (p + EXP_B) ** 2 + EXP_C


def poly_exp(x: Tensor) -> Tensor:
    """exp(x) for x <= 0 (positive inputs are clamped to 0) as HeatViT/I-BERT's i-exp.

    z = ⌊-x/ln2⌋, p = x + z·ln2 ∈ (-ln2, 0], exp(x) ≈ (0.3585·(p + 1.353)² + 0.344)·2^(-z) (a shift by z in
    hardware). ``p`` is re-folded into (-ln2, 0] after the floor so float rounding at segment edges cannot push
    it out of range: at x = -k·ln2 the result is exactly poly(0)·2^-k. Max abs error on [-20, 0]: 2.13e-3.
    """
    x = torch.clamp(x, max=0.0)
    z = torch.floor(-x / LN2)
    p = x + z * LN2
    over = p > 0  # rounding put p just above 0: it belongs to the previous segment
    z = torch.where(over, z - 1, z)
    p = torch.where(over, p - LN2, p)
    under = p <= -LN2
    z = torch.where(under, z + 1, z)
    p = torch.where(under, p + LN2, p)
    return _exp_poly(p) * torch.exp2(-z)


def poly_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """softmax with ``poly_exp``: poly_exp(x - max) / sum. Max abs error 7.9e-4 on real attention rows."""
    e = poly_exp(x - x.amax(dim=dim, keepdim=True).detach())
    return e / e.sum(dim=dim, keepdim=True)


class PolyGELU(nn.Module):
    """Drop-in for ``nn.GELU`` computing ``poly_gelu``. ``original`` (not a submodule) is the replaced module."""

    def __init__(self, original: nn.Module | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)

    @property
    def original(self) -> nn.Module | None:
        return self._original

    def forward(self, x: Tensor) -> Tensor:
        return poly_gelu(x)


class PolySoftmax(nn.Module):
    """Drop-in for ``nn.Softmax(dim)`` computing ``poly_softmax``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return poly_softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
