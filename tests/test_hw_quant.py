"""Simulated 8-bit fixed point (vitprune.hw.quant): grids, exact int32 accumulation, STE, round trip, testbed."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitprune
from conftest import make_vit
from vitprune.hw import PolyGELU, QuantLinear, calibrate, dequantize, quantize
from vitprune.hw.quant import fake_quant, to_int


def _is_pow2(s: torch.Tensor) -> bool:
    e = torch.log2(s.double())
    return bool((e == e.round()).all())


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_grid_power_of_two(per_channel):
    lin = nn.Linear(48, 20)
    q = QuantLinear(lin, per_channel=per_channel)
    s_w = q.weight_scale()
    assert _is_pow2(s_w) and s_w.shape == ((20, 1) if per_channel else ())
    w_int = fake_quant(q.weight, s_w) / s_w
    assert torch.equal(w_int, w_int.round()) and w_int.min() >= -128 and w_int.max() <= 127
    # the scale is the smallest power of two that fits: halving it would overflow int8
    m = lin.weight.abs().amax(1, keepdim=True) if per_channel else lin.weight.abs().amax()
    assert ((m / s_w) <= 127).all() and ((m / (s_w / 2)) > 127).all()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("in_features", [64, 2048])  # float32-exact branch and float64 branch (K·128² > 2^24)
def test_quantlinear_equals_integer_computation(per_channel, in_features):
    lin = nn.Linear(in_features, 24)
    with torch.no_grad():
        lin.bias.mul_(5)
    q = QuantLinear(lin, per_channel=per_channel)
    x = torch.randn(3, 5, in_features) * 2
    calibrate(nn.Sequential(q), [x * 0.3])  # calibrated range smaller than x: exercises clamping too
    y = q(x)
    p = q.integer_params(x)
    s_x, s_w = p["s_x"], p["s_w"]
    x_int = to_int(x, s_x)
    assert ((x_int == 127) | (x_int == -128)).any()  # some inputs saturate
    acc = x_int @ p["w_int"].T + p["b_int"]  # int64, an exact int32 accumulator
    assert acc.abs().max() < 2**31
    expected = (acc.double() * (s_x.double() * s_w.double()).reshape(-1)).float()
    assert torch.equal(y, expected)


def test_ste_gradients_and_qat_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    first = model[0]
    quantize(model, poly=True)
    before = first.weight.detach().clone()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(first.weight, before)  # the update lands in the original Linear's Parameter
    dequantize(model)
    assert model[0] is first and type(model[1]) is nn.GELU


def _testbed():
    from vitprune.measure.data import load_dataset
    from vitprune.models import create_model

    return create_model("testbed").eval(), load_dataset("testbed", limit=500)


def _batch(ds, n, start=0):
    return torch.stack([ds[i][0] for i in range(start, start + n)])


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_restores_model_exactly(testbed_assets):
    m, ds = _testbed()
    x = _batch(ds, 8)
    tree, state = repr(m), copy.deepcopy(m.state_dict())
    qkv = m.blocks[0].attn.qkv
    with torch.no_grad():
        ref = m(x)
    quantize(m, per_channel=True, poly=True, calibration=[x])
    assert isinstance(m.blocks[0].attn.qkv, QuantLinear) and isinstance(m.blocks[0].mlp.act, PolyGELU)
    assert isinstance(m.head, QuantLinear)
    with torch.no_grad():
        assert not torch.equal(m(x), ref)
    dequantize(m)
    assert m.blocks[0].attn.qkv is qkv and repr(m) == tree and _state_equal(m.state_dict(), state)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_composes_with_tome_both_orders(testbed_assets):
    m, ds = _testbed()
    x = _batch(ds, 16, start=100)
    state = copy.deepcopy(m.state_dict())
    with torch.no_grad():
        ref = m(x)
    # quantize, then patch
    quantize(m, calibration=[_batch(ds, 32)])
    with torch.no_grad():
        q_out = m(x)
        vitprune.patch(m, "tome", r=4)
        qt_out = m(x)
    assert not torch.equal(qt_out, q_out) and (qt_out.argmax(1) == q_out.argmax(1)).float().mean() >= 0.8
    vitprune.unpatch(m)
    dequantize(m)
    assert _state_equal(m.state_dict(), state)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    # patch, then quantize
    vitprune.patch(m, "tome", r=4)
    quantize(m, poly=True, calibration=[_batch(ds, 32)])
    with torch.enable_grad():
        out = m(x)
    assert out.shape == (16, 10) and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    dequantize(m)
    vitprune.unpatch(m)
    assert _state_equal(m.state_dict(), state)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_patched_eval_fast_path_runs_quantized_qkv(testbed_assets):
    m, ds = _testbed()
    quantize(m, calibration=[_batch(ds, 8)])
    vitprune.patch(m, "tome", r=4)
    calls = []
    m.blocks[0].attn.qkv.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        m(_batch(ds, 4))
    assert calls


def test_testbed_accuracy_int8_poly(testbed_assets):
    from vitprune.measure.accuracy import evaluate

    m, ds = _testbed()
    fp32 = evaluate(m, ds, batch_size=250, progress=False).top1
    quantize(m, poly=True, calibration=[_batch(ds, 128)])
    int8 = evaluate(m, ds, batch_size=250, progress=False).top1  # unpatched: every QuantLinear runs
    print(f"testbed top-1 (500 images): fp32 {fp32:.3f}, int8 per-tensor + poly GELU {int8:.3f}")
    # measured: fp32 0.794, int8 0.796, int8 per-channel 0.798, int8 + poly 0.794
    assert abs(int8 - fp32) <= 0.02


def test_poly_softmax_runs_in_the_engine_attention_and_dequantize_removes_it():
    import vitprune
    from vitprune.attention import EXP_ATTR
    from vitprune.hw.quant import dequantize, quantize

    model = make_vit("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    quantize(model, poly=True)
    assert all(hasattr(b.attn, EXP_ATTR) for b in model.blocks)
    vitprune.patch(model, "tome", r=0)  # the engine runs attention, so the polynomial softmax is used
    seen = []
    real = getattr(model.blocks[0].attn, EXP_ATTR)
    setattr(model.blocks[0].attn, EXP_ATTR, lambda t: seen.append(1) or real(t))
    with torch.no_grad():
        out = model(x)
    assert seen, "the engine did not call the polynomial exp"
    assert (out - ref).abs().max() < 0.5  # int8 + polynomials: close, not equal
    vitprune.unpatch(model)
    dequantize(model)
    assert not any(EXP_ATTR in vars(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_quantize_cli_one_table_of_precisions_and_methods(tmp_path, testbed_assets):
    import json

    from typer.testing import CliRunner

    from vitprune.cli import app

    result = CliRunner().invoke(app, ["quantize", "--limit", "64", "--calib-batches", "1", "-m", "tome:r=4",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "quantize.json").read_text())["rows"]
    assert [(r["extra"]["precision"], r["extra"]["spec"]) for r in rows] == [
        ("fp32", "none"), ("fp32", "tome:r=4"), ("int8", "none"), ("int8", "tome:r=4"),
        ("int8+poly", "tome:r=0"), ("int8+poly", "tome:r=4")]
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)


def test_precision_rows_fidelity_form_without_labels():
    from torch.utils.data import TensorDataset

    from vitprune.hw.precision import precision_rows

    model = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    images = torch.randn(12, 3, 32, 32)
    rows = precision_rows(model, "tiny", ["tome:r=2"], TensorDataset(images), [images[:8]], reference="fidelity")
    assert [(r.extra["precision"], r.extra["spec"]) for r in rows] == [
        ("fp32", "none"), ("fp32", "tome:r=2"), ("int8", "none"), ("int8", "tome:r=2"),
        ("int8+poly", "tome:r=0"), ("int8+poly", "tome:r=2")]
    assert all(r.top1 is None and r.top1_delta is None for r in rows)
    assert abs(rows[0].extra["cosine"] - 1.0) < 1e-6 and rows[0].extra["agreement"] == 1.0
    for r in rows[2:]:
        assert 0.9 < r.extra["cosine"] < 1.0 and 0.0 <= r.extra["agreement"] <= 1.0
    with pytest.raises(ValueError, match="reference"):
        precision_rows(model, "tiny", [], [images], [images], reference="top5")


def test_quantize_cli_fidelity_table_and_json(tmp_path, testbed_assets):
    import json

    from typer.testing import CliRunner

    from vitprune.cli import app

    result = CliRunner().invoke(app, ["quantize", "--fidelity", "--limit", "16", "--calib-batches", "1",
                                      "-m", "tome:r=4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cosine vs fp32" in result.output
    saved = json.loads((tmp_path / "quantize.json").read_text())
    assert saved["meta"]["reference"] == "fidelity"
    rows = saved["rows"]
    assert len(rows) == 6 and all(r["top1"] is None for r in rows)
    assert abs(rows[0]["extra"]["cosine"] - 1.0) < 1e-6 and rows[0]["extra"]["agreement"] == 1.0
    assert all(0.0 < r["extra"]["cosine"] <= 1.0 + 1e-6 for r in rows)


def test_quantize_cli_detects_unlabelled_data(tmp_path):
    import numpy as np
    from torch.utils.data import Subset

    from vitprune.cli import _all_labelled
    from vitprune.measure.data import NpzDataset

    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / "labelled.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    assert not _all_labelled(NpzDataset(tmp_path / "unlabelled.npz"), [])
    assert _all_labelled(Subset(NpzDataset(tmp_path / "labelled.npz"), [0, 2]), [])
    assert not _all_labelled(torch.utils.data.TensorDataset(torch.zeros(2, 3)), [0, -1])
