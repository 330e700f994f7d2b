"""Simulated 8-bit fixed point (HeatViT style): int8 weights and activations, power-of-two scales, int32 accumulators.

What is quantized: every ``nn.Linear`` (qkv, proj, fc1, fc2, the head) is replaced by a ``QuantLinear`` that
quantizes its *input* activation per tensor and its weight per tensor or per output channel to int8, with scales
that are powers of two (``scale = 2^-k``, k an integer: requantization is a shift). The patch-embedding conv,
LayerNorm, residual adds, the attention matmuls (q·kᵀ, attn·v inside the fused SDPA) and softmax stay float.
With ``poly=True`` every ``nn.GELU`` becomes ``PolyGELU`` (I-BERT polynomial), and every attention module gets the
polynomial exp for its softmax (``attention.EXP_ATTR``), which the engine's attention uses on patched models.

Exact int32 accumulation, simulated: inputs and weights are snapped to their integer grids
(``x_q = clamp(round(x / s_x), -128, 127)·s_x``, same for w), the bias to the int32 grid of ``s_x·s_w``, and the
matmul runs on those fake-quantized floats. Every product is an integer times the power of two ``s_x·s_w`` and
every partial sum is an integer multiple of it bounded by ``K·128² + |b_int|``; when that bound is below 2^24 the
float32 matmul is exact whatever the summation order, otherwise the matmul runs in float64 (exact below 2^53).
The result therefore equals ``(x_int @ w_intᵀ + b_int)·s_x·s_w`` bit for bit (tested against an int64 matmul),
rounded once to float32 at the end. Rounding uses a straight-through estimator (round's gradient is 1; clamp
keeps its own gradient), so quantization-aware training works through the same forward.

Activation scales come from calibration (``calibrate``: max |x| seen over a few batches, per QuantLinear). An
uncalibrated QuantLinear uses the current input's max |x| (dynamic quantization).

``QuantLinear`` shares the ``weight``/``bias`` Parameters of the ``nn.Linear`` it wraps and keeps a reference to
it (not a submodule); ``dequantize`` puts the originals back, so the round trip gives the same module tree,
state_dict and outputs (and QAT updates land in the original Linear's parameters).

The token engine's inference fast path only takes plain ``nn.Linear``/``nn.GELU`` layers, so on a patched model
every swapped-in layer runs through its own ``forward``, in any grad mode.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import EXP_ATTR
from .poly import PolyGELU, poly_exp

QMIN, QMAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_F32_EXACT = 2**24


def pow2_scale(max_abs: Tensor) -> Tensor:
    """Smallest power of two ``s = 2^-k`` with ``max_abs / s <= 127`` (elementwise; 1 where max_abs is 0)."""
    max_abs = max_abs.detach().double()
    e = torch.ceil(torch.log2(max_abs / QMAX))
    s = torch.exp2(e)
    s = torch.where(s * QMAX < max_abs, s * 2, s)  # guard log2 rounding
    return torch.where(max_abs > 0, s, torch.ones_like(s)).float()


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: Tensor, scale: Tensor, qmin: int = QMIN, qmax: int = QMAX) -> Tensor:
    """``clamp(round_ste(x / scale), qmin, qmax) * scale`` (scale broadcast against x)."""
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def to_int(x: Tensor, scale: Tensor, qmin: int = QMIN, qmax: int = QMAX) -> Tensor:
    """The integer grid values ``clamp(round(x / scale), qmin, qmax)`` as int64 (no gradient)."""
    return torch.clamp(torch.round(x.detach().double() / scale.double()), qmin, qmax).long()


class QuantLinear(nn.Module):
    """int8 x int8 -> int32 fake-quant replacement for an ``nn.Linear`` (see the module docstring).

    ``input_max`` (buffer, 0 until calibrated; finite so ``vitprune.patch`` accepts it) is the calibrated max |input|; ``calibrating`` makes forward
    widen it with each batch. ``original`` is the wrapped ``nn.Linear`` (shared Parameters).
    """

    def __init__(self, linear: nn.Linear, *, per_channel: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_original", linear)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.per_channel = per_channel
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_max", torch.zeros((), device=linear.weight.device))
        self.calibrating = False

    @property
    def original(self) -> nn.Linear:
        return self._original

    # --- scales and integer grids -------------------------------------------------------------------------
    def weight_scale(self) -> Tensor:
        w = self.weight.detach()
        m = w.abs().amax(dim=1, keepdim=True) if self.per_channel else w.abs().amax()
        return pow2_scale(m)

    def input_scale(self, x: Tensor | None = None) -> Tensor:
        m = self.input_max
        if m <= 0:
            if x is None:
                raise RuntimeError("uncalibrated QuantLinear: pass the input to get a dynamic scale")
            m = x.detach().abs().amax()
        return pow2_scale(m)

    def bias_scale(self, s_x: Tensor, s_w: Tensor) -> Tensor:
        return (s_x * s_w).reshape(-1)  # [1] or [out]

    def integer_params(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """The int64 grids and scales used for ``x``: w_int, b_int (or None), s_x, s_w (for independent checks)."""
        s_x, s_w = self.input_scale(x), self.weight_scale()
        s_b = self.bias_scale(s_x, s_w)
        return {
            "w_int": to_int(self.weight, s_w),
            "b_int": None if self.bias is None else to_int(self.bias, s_b, INT32_MIN, INT32_MAX),
            "s_x": s_x, "s_w": s_w,
        }

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            with torch.no_grad():
                seen = x.detach().abs().amax().to(self.input_max)
                self.input_max.copy_(torch.maximum(self.input_max, seen))
        s_x, s_w = self.input_scale(x), self.weight_scale()
        xq = fake_quant(x, s_x)
        wq = fake_quant(self.weight, s_w)
        bq = None
        bound = self.in_features * 128 * 128
        if self.bias is not None:
            s_b = self.bias_scale(s_x, s_w)
            bq = fake_quant(self.bias, s_b, INT32_MIN, INT32_MAX)
            bound += int((bq.detach() / s_b).abs().max().item())
        if bound < _F32_EXACT and x.dtype == torch.float32:
            return F.linear(xq, wq, bq)
        y = F.linear(xq.double(), wq.double(), None if bq is None else bq.double())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        cal = "uncalibrated" if self.input_max <= 0 else f"input_max={self.input_max.item():.4g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, per_channel={self.per_channel}, {cal}")


def _swap(model: nn.Module, make) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, name, new)
                n += 1
    return n


def quantize(model: nn.Module, *, per_channel: bool = False, poly: bool = False,
             calibration: Iterable | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` for a ``QuantLinear`` (and ``nn.GELU`` for ``PolyGELU`` when ``poly``), in place.

    ``calibration``: optional batches (tensors or ``(x, y)`` pairs) passed to ``calibrate``. Returns ``model``.
    Already-swapped modules are left alone, so calling it twice is harmless.
    """
    def make(child: nn.Module) -> nn.Module | None:
        if type(child) is nn.Linear:
            return QuantLinear(child, per_channel=per_channel)
        if poly and type(child) is nn.GELU:
            return PolyGELU(child)
        return None

    _swap(model, make)
    if poly:  # the softmax too: the engine's attention reads this hook (a patched model; use r=0 for no reduction)
        for module in _attention_modules(model):
            setattr(module, EXP_ATTR, poly_exp)
    if calibration is not None:
        calibrate(model, calibration)
    return model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules the backends run attention for (timm ``Attention``; HF self-attention blocks)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and (hasattr(m, "num_heads") or hasattr(m, "attention"))]


def calibrate(model: nn.Module, batches: Iterable, *, reset: bool = True) -> nn.Module:
    """Run ``batches`` (tensors or ``(x, y)`` pairs) through ``model`` and record each QuantLinear's max |input|.

    Runs with grad enabled but no backward, so the engine's eval fast path (which bypasses ``attn.qkv``) is not
    taken and every QuantLinear sees its input. ``reset=False`` widens existing ranges instead of starting over.
    """
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not qls:
        raise ValueError("no QuantLinear in the model; call quantize(model) first")
    for q in qls:
        if reset:
            q.input_max.zero_()
        q.calibrating = True
    param = next(model.parameters())
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device=param.device, dtype=param.dtype))
    finally:
        for q in qls:
            q.calibrating = False
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Put back the original ``nn.Linear`` / ``nn.GELU`` modules, in place. Returns ``model``."""
    def make(child: nn.Module) -> nn.Module | None:
        if isinstance(child, (QuantLinear, PolyGELU)) and child.original is not None:
            return child.original
        return None

    _swap(model, make)
    for module in model.modules():
        if EXP_ATTR in vars(module):
            delattr(module, EXP_ATTR)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, PolyGELU)) or EXP_ATTR in vars(m) for m in model.modules())
