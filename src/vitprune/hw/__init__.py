"""Hardware path: HeatViT-style 8-bit fixed point (fake-quant), polynomial non-linearities, accelerator latency model."""
from .accel import AcceleratorConfig, AccelResult, PRESETS, calibration_check, heatvit_like_tokens, predict, vit_info
from .poly import PolyGELU, PolySoftmax, poly_erf, poly_exp, poly_gelu, poly_softmax
from .quant import (QuantLinear, calibrate, dequantize, fake_quant, is_quantized, pow2_scale, quantize,
                    round_ste)

__all__ = [
    "AccelResult", "AcceleratorConfig", "PRESETS", "calibration_check", "heatvit_like_tokens", "predict", "vit_info",
    "PolyGELU", "PolySoftmax", "QuantLinear", "calibrate", "dequantize", "fake_quant", "is_quantized",
    "poly_erf", "poly_exp", "poly_gelu", "poly_softmax", "pow2_scale", "quantize", "round_ste",
]
