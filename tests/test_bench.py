"""Cost accounting and the bench command: MACs as the papers count them, specs, CLI outputs."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import vitprune
from vitprune.bench import BenchSettings, default_specs, noisy_timings, run_bench
from vitprune.cli import app
from vitprune.measure.flops import paper_vit_macs
from vitprune.specs import format_method_spec, parse_method_spec

from conftest import make_vit


def paper_macs_from_trace(model) -> float:
    """DESIGN.md §3 formula evaluated on the token counts the patched model actually ran with."""
    trace = vitprune.last_trace(model)
    c = model.embed_dim
    patch_embed = model.patch_embed.num_patches * c * model.patch_embed.proj.weight[0].numel()
    return paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, c, patch_embed, c * model.num_classes)


@pytest.mark.parametrize(
    "method,cfg,paper_gmacs",
    [
        ("tome", {"r": 8}, 3.42),
        ("tome", {"r": 13}, 2.70),
        ("tome", {"r": 16}, 2.29),
        ("evit", {"keep": 0.7, "blocks": (3, 6, 9)}, 3.03),
        ("ppt", {"r": 50}, 2.94),
    ],
)
@pytest.mark.smoke
def test_deit_small_macs_match_papers(method, cfg, paper_gmacs):
    model = make_vit("deit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    assert abs(vitprune.count_macs(model, x).gmacs - 4.60) / 4.60 < 0.01
    vitprune.patch(model, method, **cfg)
    measured = vitprune.count_macs(model, x).macs
    assert abs(measured / 1e9 - paper_gmacs) / paper_gmacs < 0.01
    # executed ops agree with the formula on the executed token counts (ToMe's matching adds < 0.5%)
    assert abs(measured - paper_macs_from_trace(model)) / measured < 0.005


def test_method_specs_round_trip():
    assert parse_method_spec("tome:r=13") == ("tome", {"r": 13})
    assert parse_method_spec("evit:keep=0.7,blocks=(3,6,9)") == ("evit", {"keep": 0.7, "blocks": (3, 6, 9)})
    assert parse_method_spec("tome:r=[1, 2,3], prop_attn=False") == ("tome", {"r": [1, 2, 3], "prop_attn": False})
    assert parse_method_spec("ppt:policy=pool") == ("ppt", {"policy": "pool"})
    name, cfg = parse_method_spec("evit:keep=0.5,blocks=(2,8)")
    assert parse_method_spec(format_method_spec(name, cfg)) == (name, cfg)
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("tome:13")
    assert default_specs(196)[:3] == ["tome:r=8", "tome:r=13", "tome:r=16"]
    assert default_specs(196, "core")[-2:] == ["ppt:r=50", "togo:keep=0.69"]  # the papers' default levels
    assert len(default_specs(64, "all")) == 15
    with pytest.raises(ValueError, match="suite"):
        default_specs(196, "most")


def test_run_bench_rows_without_data():
    model = make_vit("deit_tiny_patch16_224", img_size=64)
    settings = BenchSettings(batch_size=4, rounds=1)
    result = run_bench(model, "tiny64", ["tome:r=2", "evit:keep=0.5"], None, settings, torch.randn(2, 3, 64, 64))
    base, tome, evit = result.rows
    assert [r.method for r in result.rows] == ["none", "tome", "evit"]
    assert base.speedup == 1.0 and base.macs_ratio == 1.0 and base.top1 is None
    assert tome.gmacs < base.gmacs and evit.gmacs < base.gmacs
    assert tome.tokens_per_layer == [17, 15, 13, 11, 9, 7, 5, 3, 2, 2, 2, 2]  # r clamped to half the patches
    assert all(r.img_per_s > 0 for r in result.rows)
    assert not vitprune.is_patched(model)
    assert isinstance(result.meta["noisy_timings"], list)
    tome.extra.update(latency_ms=10.0, latency_iqr_ms=3.0)
    assert "tome:r=2" in noisy_timings(result.rows)
    with pytest.raises(ValueError, match="unknown method"):  # a bad spec fails before any measurement
        run_bench(model, "tiny64", ["bogus:x=1"], None, settings, torch.randn(2, 3, 64, 64))


@pytest.mark.usefixtures("testbed_assets")
def test_cli_bench_on_testbed(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", "--limit", "200", "--rounds", "1", "--batch-size", "8",
        "-m", "tome:r=4", "-m", "evit:keep=0.5", "--out", str(out), "--speed-model", "deit_tiny_patch16_224",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "bench.json").read_text())
    rows = doc["rows"]
    assert [r["method"] for r in rows] == ["none", "tome", "evit"]
    assert doc["meta"]["n_eval"] == 200 and doc["meta"]["threads"] == 2
    assert all(0.0 < r["top1"] <= 1.0 for r in rows)
    assert rows[0]["top1_delta"] == 0.0 and rows[1]["gmacs"] < rows[0]["gmacs"]
    assert (out / "bench.csv").exists() and (out / "pareto.png").stat().st_size > 5000
    assert "tome" in result.output and "GMACs" in result.output
    assert "accuracy at ≈ −35% MACs" in result.output and "evit: " in result.output
    assert all(r["img_per_s"] is None for r in rows)  # 64 tokens: timed on the speed model instead
    speed = json.loads((out / "speed" / "bench.json").read_text())["rows"]
    assert [r["model"] for r in speed] == ["deit_tiny_patch16_224"] * 3 and all(r["img_per_s"] > 0 for r in speed)
    assert "Speed is timed on deit_tiny_patch16_224" in " ".join(result.output.split())


def test_cli_rejects_bad_method():
    result = CliRunner().invoke(app, ["bench", "--model", "deit_tiny_patch16_224", "-m", "evit:keep=2",
                                      "--no-speed"])
    assert result.exit_code == 2 and "(0, 1]" in result.output and "Traceback" not in result.output


def test_peak_memory_is_per_block():
    """The probe sees a block's own allocation, and a reset forgets it (the bench reads one peak per timed block)."""
    from vitprune.measure.memory import PeakMemory

    probe = PeakMemory("cpu")
    if not probe.resettable:
        pytest.skip(f"no per-block reset here: {probe.kind}")
    probe.reset()
    base = probe.read_mib()
    block = torch.ones(64 << 20)  # 256 MiB, touched
    del block
    peak = probe.read_mib()
    assert peak > base + 200
    probe.reset()
    assert probe.read_mib() < peak - 200


def test_latency_percentiles_over_calls():
    """per_call timing: every call is a sample, so p90 >= p50 and a slow call every few moves p90, not p50."""
    import time

    from vitprune.measure.speed import interleaved_throughput

    calls = {"n": 0}

    def model(x):
        calls["n"] += 1
        time.sleep(0.02 if calls["n"] % 4 == 0 else 0.002)
        return x

    fast, = interleaved_throughput(model, torch.zeros(1, 3), [lambda: None], threads=1, rounds=3,
                                   min_round_time=0.2, per_call=True)
    assert fast.latency_ms_median < 10 and fast.latency_ms_p90 > 15
    block, = interleaved_throughput(model, torch.zeros(1, 3), [lambda: None], threads=1, rounds=2, min_round_time=0.1)
    assert block.latency_ms_p90 is None
