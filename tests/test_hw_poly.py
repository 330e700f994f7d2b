"""Polynomial non-linearities (vitprune.hw.poly): measured error bounds, edges, monotonicity, modules."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from vitprune.hw.poly import LN2, PolyGELU, PolySoftmax, _exp_poly, poly_erf, poly_exp, poly_gelu, poly_softmax


def test_poly_erf_and_gelu_error_bounds():
    x = torch.linspace(-8, 8, 1_600_001, dtype=torch.float64)
    assert (poly_erf(x) - torch.erf(x)).abs().max() < 0.0965  # measured 9.63e-2 (the jump at 0)
    err = (poly_gelu(x) - F.gelu(x)).abs()
    assert err.max() < 0.0185  # measured 1.815e-2
    far = x.abs() >= 2.51  # L saturates at ±1: exact there
    assert torch.equal(poly_gelu(x[far]), 0.5 * x[far] * (1 + torch.sign(x[far])))


def test_poly_exp_error_bound():
    x = torch.linspace(-20, 0, 2_000_001, dtype=torch.float64)
    y = poly_exp(x)
    assert (y - x.exp()).abs().max() < 2.2e-3  # measured 2.128e-3
    assert (y / x.exp() - 1).abs().max() < 3.2e-3  # measured 3.10e-3 relative


def test_poly_exp_exact_at_segment_edges():
    k = torch.arange(0, 40, dtype=torch.float64)
    c0 = _exp_poly(torch.zeros((), dtype=torch.float64))
    assert torch.equal(poly_exp(-k * LN2), c0 * torch.exp2(-k))  # the shift is exact; only poly(0) is approximate
    assert abs(c0.item() - 1.0) < 2.8e-4  # 0.3585·1.353² + 0.344 = 1.000273
    # float32 inputs near edges keep p in (-ln2, 0]
    x32 = (-k * LN2).float()
    assert torch.isfinite(poly_exp(x32)).all()
    assert poly_exp(torch.tensor([5.0]))[0] == c0.float()  # positive inputs clamp to 0


def test_poly_exp_monotone():
    x = torch.linspace(-20, 0, 400_001, dtype=torch.float64)
    y = poly_exp(x)
    z = torch.floor(-x / LN2)
    d = y.diff()
    same = z[1:] == z[:-1]
    assert (d[same] > 0).all()  # strictly increasing inside each segment
    # across an edge the I-BERT coefficients leave a step of at most 4.4e-5·2^-z (relative 8.8e-5)
    assert (d[~same] >= -9e-5 * y[1:][~same]).all()


def _testbed_attention_logits():
    from vitprune.measure.data import load_dataset
    from vitprune.models import create_model

    ds = load_dataset("testbed", limit=16)
    x = torch.stack([ds[i][0] for i in range(16)])
    m = create_model("testbed").eval()
    logits = []

    def hook(mod, inp, out):
        a = m.blocks[0].attn
        b, n, _ = out.shape
        q, k, _v = out.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits.append((q @ k.transpose(-1, -2)) * a.scale)

    hs = [blk.attn.qkv.register_forward_hook(hook) for blk in m.blocks]
    with torch.no_grad():
        m(x)
    for h in hs:
        h.remove()
    return torch.cat(logits)


def test_poly_softmax_on_real_attention_logits(testbed_assets):
    logits = _testbed_attention_logits()
    p = poly_softmax(logits, dim=-1)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    assert (p - logits.softmax(-1)).abs().max() < 1e-3  # measured 7.90e-4 (16 images, 12 blocks, 3 heads)


def test_modules_match_functions_and_have_gradients():
    x = torch.randn(4, 7, requires_grad=True)
    assert torch.equal(PolyGELU()(x), poly_gelu(x))
    assert torch.equal(PolySoftmax(dim=0)(x), poly_softmax(x, 0))
    poly_softmax(x, -1)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    g = torch.nn.GELU()
    assert PolyGELU(g).original is g and len(list(PolyGELU(g).children())) == 0
