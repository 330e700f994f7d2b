"""Latency LUT: profiling, monotone curves, exact/linear/differentiable interpolation, files, model checks, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from vitprune.backends.timm import model_info
from vitprune.cli import app
from vitprune.train.lut import (
    LatencyLUT,
    check_lut,
    default_counts,
    latency_sparsity_loss,
    monotone_fit,
    profile_lut,
    resolve_counts,
)

from conftest import make_vit

COUNTS = [1, 5, 9, 17]  # a 64x64 ViT-Ti/16 has 16 patches + CLS = 17 tokens


def tiny_vit(**kwargs):
    return make_vit("vit_tiny_patch16_224", img_size=64, depth=2, **kwargs)


def quick(model, **kwargs) -> LatencyLUT:
    settings = dict(batch_size=2, threads=1, counts=COUNTS, rounds=1, min_round_time=0.005, warmup=1)
    return profile_lut(model, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def profiled() -> LatencyLUT:
    torch.manual_seed(0)
    return quick(tiny_vit())


def hand_lut(selector: bool = True) -> LatencyLUT:
    """Awkward floats on purpose, so 'exact' means bit for bit."""
    return LatencyLUT(
        token_counts=[1, 4, 10],
        attn_ms=[[0.1, 0.7, 1.3000000000000003], [0.2, 0.3, 2.9]],
        mlp_ms=[[0.11, 0.5, 1.7], [0.13, 0.9, 1.1]],
        selector_ms=[0.01, 0.03, 0.07] if selector else None,
        fixed_ms=0.25,
        meta={"model": "hand", "depth": 2, "dim": 192, "num_heads": 3, "num_tokens": 10},
    )


def test_default_grid_and_counts():
    assert default_counts(65) == [1, *range(4, 61, 4), 65]
    assert default_counts(197) == [1, *range(12, 181, 12), 197]
    assert resolve_counts("all", 17) == list(range(1, 18))
    assert resolve_counts([9, 1, 9], 17) == [1, 9, 17]  # sorted, deduplicated, N appended
    for bad in ([0, 5], [5, 18], [2.5], "some", [True]):
        with pytest.raises(ValueError):
            resolve_counts(bad, 17)


def test_monotone_fit_pools_violators():
    assert monotone_fit([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone_fit([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone_fit([5.0, 1.0, 1.0, 1.0, 9.0]) == [2.0, 2.0, 2.0, 2.0, 9.0]  # not a running max (5, 5, 5, 5)


def test_profiled_lut_is_monotone_with_metadata(profiled):
    lut = profiled
    assert lut.token_counts == COUNTS and lut.depth == 2 and lut.num_tokens == 17
    for rows in (lut.attn_ms, lut.mlp_ms):
        for row in rows:
            assert len(row) == len(COUNTS) and all(b >= a for a, b in zip(row, row[1:])) and row[0] > 0
    assert lut.attn_ms[0] == lut.attn_ms[1] and lut.mlp_ms[0] == lut.mlp_ms[1]  # block 0 stands for all
    assert lut.attn_ms_raw is not None and lut.mlp_ms_raw is not None and lut.selector_ms is None
    assert lut.fixed_ms > 0 and lut.full_ms() > lut.fixed_ms
    meta = lut.meta
    assert meta["threads"] == 1 and meta["batch_size"] == 2 and meta["dtype"] == "float32"
    assert meta["device"] == "cpu" and meta["rounds"] == 1 and meta["torch"] == torch.__version__
    assert meta["dim"] == 192 and meta["num_tokens"] == 17 and "reused" in meta["blocks_timed"]
    assert meta["model"] == "vit_tiny_patch16_224" and meta["date"] and meta["device_name"]


def test_interpolation_exact_at_measured_points_and_linear_between(profiled):
    for lut in (hand_lut(), profiled):
        for b in range(lut.depth):
            for j, n in enumerate(lut.token_counts):
                assert lut.attn_cost_ms(b, n).item() == lut.attn_ms[b][j]
                assert lut.mlp_cost_ms(b, float(n)).item() == lut.mlp_ms[b][j]
    lut = hand_lut()
    assert lut.block_ms(1, 7.0).item() == pytest.approx((0.3 + 2.9) / 2 + (0.9 + 1.1) / 2, abs=1e-12)
    assert lut.attn_cost_ms(0, 2.0).item() == pytest.approx(0.1 + 0.6 / 3, abs=1e-12)
    assert lut.block_ms(0, 10, 4).item() == pytest.approx(1.3 + 0.5, abs=1e-12)  # attention and MLP counts apart
    assert lut.selector_cost_ms(4).item() == 0.03
    # outside the measured counts: the end segments, extended linearly
    assert lut.attn_cost_ms(0, 0.5).item() == pytest.approx(0.1 - 0.5 * 0.6 / 3, abs=1e-12)


def test_predict_ms_sums_blocks_fixed_and_selectors():
    lut = hand_lut()
    full = 0.25 + (1.3000000000000003 + 1.7) + (2.9 + 1.1)
    assert lut.full_ms() == pytest.approx(full, abs=1e-12)
    pred = lut.predict_ms([4, 10], [1, 10], selectors_at=[1])
    assert pred.item() == pytest.approx(0.25 + 0.7 + 0.11 + 2.9 + 1.1 + 0.07, abs=1e-12)
    batch = lut.predict_ms(torch.tensor([[4.0, 10.0], [10.0, 10.0]]))  # [..., depth] tensors: one prediction each
    assert batch.shape == (2,) and batch[1].item() == pytest.approx(full, abs=1e-12)
    assert lut.predicted_speedup([10, 10]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one token count per block"):
        lut.predict_ms([4])
    with pytest.raises(ValueError, match=">= 0"):
        lut.predict_ms([-1.0, 4])
    with pytest.raises(ValueError, match="no selector"):
        hand_lut(selector=False).predict_ms([4, 4], selectors_at=[0])
    with pytest.raises(ValueError, match="block"):
        lut.predict_ms([4, 4], selectors_at=[2])


def test_gradient_wrt_soft_counts_is_positive(profiled):
    lut = hand_lut()
    keep = torch.tensor([0.55, 0.35], requires_grad=True)  # soft keep ratios → soft counts
    counts = keep * 10
    pred = lut.predict_ms(counts, selectors_at=[1])
    pred.backward()
    # block 0 at 5.5 tokens (segment 4..10), block 1 at 3.5 tokens (segment 1..4) plus its selector; × d count/d keep
    slopes = torch.tensor([(0.6 + 1.2) / 6 * 10, (0.1 + 0.77 + 0.02) / 3 * 10])
    assert torch.allclose(keep.grad, slopes.float()) and (keep.grad > 0).all()
    # a profiled curve is non-decreasing, so its slope is never negative (it may be flat where noise was pooled)
    for value in (3.0, 12.0, 16.0):
        n = torch.tensor(value, requires_grad=True)
        profiled.predict_ms([n, n]).backward()
        assert n.grad.item() >= 0
    assert profiled.predict_ms([1, 1]).item() <= profiled.full_ms()


def test_save_load_round_trip(tmp_path, profiled):
    for lut in (profiled, hand_lut()):
        path = tmp_path / "sub" / "lut.json"
        lut.save(path)
        back = LatencyLUT.load(path)
        assert back == lut
        assert back.full_ms() == lut.full_ms()
    doc = json.loads(path.read_text())
    assert doc["format"] == "vitprune.latency_lut" and doc["version"] == 1


def test_malformed_files_raise_value_error(tmp_path):
    good = hand_lut().to_dict()
    cases = {
        "not json": "{nope",
        "wrong format": json.dumps({**good, "format": "something.else"}),
        "future version": json.dumps({**good, "version": 99}),
        "missing table": json.dumps({k: v for k, v in good.items() if k != "mlp_ms"}),
        "decreasing curve": json.dumps({**good, "attn_ms": [[0.1, 0.7, 0.5], [0.2, 0.3, 2.9]]}),
        "wrong length": json.dumps({**good, "mlp_ms": [[0.1, 0.5], [0.1, 0.9]]}),
        "unsorted counts": json.dumps({**good, "token_counts": [1, 10, 4]}),
        "nan": json.dumps({**good, "fixed_ms": float("nan")}),
        "meta says other N": json.dumps({**good, "meta": {"num_tokens": 11}}),
    }
    for what, text in cases.items():
        path = tmp_path / f"{what}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match="vitprune lut|latency LUT"):
            LatencyLUT.load(path)
    with pytest.raises(FileNotFoundError, match="vitprune lut"):
        LatencyLUT.load(tmp_path / "absent.json")


def test_check_model_rejects_another_model(profiled):
    model = tiny_vit()
    profiled.check_model(model_info(model))
    profiled.check_model(model)
    for other in (make_vit("vit_tiny_patch16_224", img_size=64, depth=3),  # depth
                  make_vit("vit_tiny_patch16_224", img_size=96, depth=2),  # token count
                  make_vit("vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=96)):  # width
        with pytest.raises(ValueError, match="profiled for another model"):
            profiled.check_model(model_info(other))


def test_latency_sparsity_loss():
    budget = 10.0
    assert latency_sparsity_loss(torch.tensor(10.0), budget).item() == 0.0
    assert latency_sparsity_loss(torch.tensor(12.0), budget).item() == pytest.approx(0.04)
    assert latency_sparsity_loss(torch.tensor(8.0), budget).item() == pytest.approx(0.04)  # two-sided
    # scale-free: the same relative miss costs the same on a 1000x slower device
    assert latency_sparsity_loss(torch.tensor(12000.0), 10000.0).item() == pytest.approx(0.04)
    lut = hand_lut()
    n = torch.tensor(8.0, requires_grad=True)
    loss = latency_sparsity_loss(lut.predict_ms([n, n]), 0.5 * lut.full_ms())
    loss.backward()
    assert loss.item() > 0 and n.grad.item() > 0  # over budget: fewer tokens lower the loss
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="budget_ms"):
            latency_sparsity_loss(torch.tensor(1.0), bad)


def test_profile_options_selector_per_block_and_dtype():
    model = tiny_vit().train()
    selector = nn.Sequential(nn.LayerNorm(192), nn.Linear(192, 2))
    lut = quick(model, selector=selector, per_block=True, dtype=torch.bfloat16, counts=[1, 17])
    assert model.training and next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert lut.selector_ms is not None and len(lut.selector_ms) == 2 and lut.selector_ms[1] >= lut.selector_ms[0]
    assert lut.selector_cost_ms(9.0).item() > 0 and lut.meta["selector"] == "Sequential"
    assert lut.meta["per_block"] and lut.meta["blocks_timed"] == "each" and lut.meta["dtype"] == "bfloat16"
    assert len(lut.attn_ms_raw) == 2


def test_profile_rejects_bad_input():
    model = tiny_vit()
    with pytest.raises(ValueError, match="VisionTransformer"):
        profile_lut(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        quick(model, batch_size=0)
    with pytest.raises(ValueError, match="outside 1..17"):
        quick(model, counts=[1, 40])
    model.blocks[1].mlp.fc1 = nn.Linear(192, 384)
    model.blocks[1].mlp.fc2 = nn.Linear(384, 192)
    with pytest.raises(ValueError, match="per_block=True"):
        quick(model)


def test_check_lut_compares_with_real_forwards(profiled):
    model = make_vit("vit_tiny_patch16_224", img_size=64, depth=2)
    rows = check_lut(profiled, model, ["tome:r=0", "evit:keep=0.5,blocks=(1,)"], rounds=1, min_round_time=0.01)
    assert [r.spec for r in rows] == ["tome:r=0", "evit:keep=0.5,blocks=(1,)", "unpatched"]
    assert rows[0].predicted_speedup == 1.0 and rows[0].measured_speedup == 1.0
    assert rows[1].tokens_mlp[1] < rows[1].tokens_attn[1] == 17 and rows[1].predicted_ms <= rows[0].predicted_ms
    assert all(r.measured_ms > 0 for r in rows) and not hasattr(model, "_vitprune")


def test_cli_lut_on_testbed_architecture(tmp_path):
    out = tmp_path / "lut.json"
    result = CliRunner().invoke(app, [
        "lut", "--model", "testbed", "--batch-size", "1", "--threads", "1", "--counts", "1,33", "--rounds", "1",
        "--out", str(out), "--check", "-m", "tome:r=0", "-m", "evit:keep=0.5,blocks=(6,)",
    ])
    assert result.exit_code == 0, result.output
    lut = LatencyLUT.load(out)
    assert lut.token_counts == [1, 33, 65] and lut.depth == 12 and lut.meta["model"] == "testbed"
    from vitprune.models import create_model

    lut.check_model(create_model("testbed", shared_weights=False))
    assert "predicted unpruned total" in result.output and "block ms" in result.output
    assert "measured speedup" in result.output and "evit:keep=0.5" in result.output
    assert lut.meta["selector"] == "SelectionStep"  # the whole selection (score, top-k, gather, package) is timed
    bad = CliRunner().invoke(app, ["lut", "--model", "testbed", "--counts", "1,x", "--out", str(out)])
    assert bad.exit_code != 0
    # --table: check the LUT a model was trained against, without profiling a new one
    again = CliRunner().invoke(app, ["lut", "--model", "testbed", "--check", "--table", str(out), "--rounds", "1",
                                     "-m", "tome:r=0", "-m", "heatvit:keep=(0.5,0.3,0.2)"])
    assert again.exit_code == 0, again.output
    assert "measured speedup" in again.output and "block ms" not in again.output
    assert CliRunner().invoke(app, ["lut", "--model", "testbed", "--table", str(out)]).exit_code != 0
