"""Hardware path: HeatViT-style 8-bit fixed point (fake-quant) and polynomial non-linearities."""
from .poly import PolyGELU, PolySoftmax, poly_erf, poly_exp, poly_gelu, poly_softmax
from .quant import (QuantLinear, calibrate, dequantize, fake_quant, is_quantized, pow2_scale, quantize,
                    round_ste)

__all__ = [
    "PolyGELU", "PolySoftmax", "QuantLinear", "calibrate", "dequantize", "fake_quant", "is_quantized",
    "poly_erf", "poly_exp", "poly_gelu", "poly_softmax", "pow2_scale", "quantize", "round_ste",
]
