"""The accelerator latency model: its scaling laws, the cost of choosing tokens, the HeatViT calibration, the CLI."""
from __future__ import annotations

import json
import math

import pytest

from vitprune.hw.accel import (HEATVIT_SPEEDUP_RANGE, AcceleratorConfig, attention_ops, bitonic_sort_cycles,
                               calibration_check, gemm, mlp_ops, predict, reduction_ops, selector_ops, vit_info)

DEIT_T = vit_info()  # depth 12, C 192, 3 heads, 196 patches + CLS
CFG = AcceleratorConfig()


def _cycles(ops, names=None) -> float:
    return sum(o.cycles for o in ops if names is None or o.name in names)


def test_projections_and_mlp_are_linear_in_tokens():
    ns = (50, 100, 150)
    proj = [_cycles(attention_ops(DEIT_T, n, CFG), {"qkv", "proj"}) for n in ns]
    mlp = [_cycles(mlp_ops(DEIT_T, n, CFG)) for n in ns]
    for c in (proj, mlp):
        assert c[2] - c[1] == pytest.approx(c[1] - c[0]) and c[1] > c[0]  # equal steps: linear
    c = DEIT_T.dim
    assert sum(o.macs for o in mlp_ops(DEIT_T, 100, CFG)) == 8 * 100 * c * c  # DESIGN.md §3: 8NC²


def test_attention_matmuls_and_softmax_are_quadratic_in_tokens():
    ns = (64, 128, 192)  # multiples of the array size, so tiling adds no steps
    quad = [_cycles(attention_ops(DEIT_T, n, CFG), {"q·kᵀ", "softmax", "a·v"}) for n in ns]
    assert (quad[2] - quad[1]) / (quad[1] - quad[0]) == pytest.approx(5 / 3)  # (192²−128²)/(128²−64²): aN² + b
    assert quad[1] / quad[0] > 3  # linear would double; the fixed pipeline fills keep it under 4
    macs = sum(o.macs for o in attention_ops(DEIT_T, 128, CFG) if o.name in ("q·kᵀ", "a·v"))
    assert macs == 2 * 128 ** 2 * DEIT_T.dim  # DESIGN.md §3: 2N²C


def test_unpruned_model_matches_the_papers_macs_and_has_speedup_one():
    res = predict(DEIT_T, [197] * 12)
    n, c = 197, DEIT_T.dim
    formula = 12 * (4 * n * c * c + 2 * n * n * c + 8 * n * c * c) + 196 * 3 * 16 ** 2 * c + c * 1000
    assert res.macs == formula and abs(res.macs / 1e9 - 1.25) < 0.01  # DeiT-T "1.3 G"
    assert res.speedup == 1.0
    assert predict(DEIT_T, [197] * 12, method="tome").speedup == 1.0  # r = 0: nothing chosen, nothing charged
    assert res.latency_ms == pytest.approx(res.cycles / 150e3)


def test_selector_costs_what_design_counts():
    n, c = 197, DEIT_T.dim
    assert sum(o.macs for o in selector_ops(DEIT_T, n, CFG)) == 5 / 8 * n * c * c + n * c / 2


def test_sorting_costs_more_than_ranking_groups():
    assert bitonic_sort_cycles(256, 1) == 128 * 36  # P/2 compare-exchanges × log P (log P + 1)/2 stages
    assert bitonic_sort_cycles(1, 4) == 0
    topk = reduction_ops("topk", DEIT_T, 197, 137, CFG)
    group = reduction_ops("group", DEIT_T, 197, 137, CFG, group=2)
    sort = lambda ops: sum(o.cycles for o in ops if o.unit == "sorter")  # noqa: E731
    assert sort(topk) > 3 * sort(group) > 0
    assert _cycles(topk) > _cycles(group)
    # the same tokens through the whole model: ToGo 2×2 groups pay less to choose them than per-token ToGo
    attn = [197] * 4 + [137] * 3 + [93] * 3 + [65] * 2
    g2 = predict(DEIT_T, attn, None, "togo", group=2)
    g1 = predict(DEIT_T, attn, None, "togo", group=1)
    assert g2.part_cycles("reduction") < g1.part_cycles("reduction") and g2.speedup > g1.speedup
    match = reduction_ops("match", DEIT_T, 197, 184, CFG)
    assert any(o.name == "similarity" and o.macs == 98 * 64 * 98 for o in match)  # N/2 × N/2 × head_dim


def test_heatvit_like_deit_tiny_lands_in_the_papers_range():
    lo, hi = HEATVIT_SPEEDUP_RANGE
    full = predict(DEIT_T, [197] * 12)
    for res in calibration_check():
        assert lo <= res.speedup <= hi, res.speedup
        assert 0.284 <= 1 - res.macs / full.macs <= 0.653  # inside HeatViT's quoted MACs reductions
        assert [i for i, b in enumerate(res.blocks) if b.part_cycles("selector") > 0] == [4, 7, 10]


def test_memory_bound_when_bandwidth_is_tiny():
    slow = AcceleratorConfig(dram_gbps=0.1)
    op = gemm("fc1", "mlp", 10, 192, 768, slow)
    assert op.cycles == op.memory_cycles > op.compute_cycles
    summed = AcceleratorConfig(dram_gbps=0.1, overlap_dram=False)
    assert gemm("fc1", "mlp", 10, 192, 768, summed).cycles == pytest.approx(op.memory_cycles + op.compute_cycles)


@pytest.mark.parametrize("kwargs, field", [
    (dict(pe_rows=0), "pe_rows"), (dict(pe_cols=-4), "pe_cols"), (dict(clock_mhz=math.nan), "clock_mhz"),
    (dict(dram_gbps=0.0), "dram_gbps"), (dict(vector_lanes=2.5), "vector_lanes"),
    (dict(overlap_dram="yes"), "overlap_dram"),
])
def test_bad_config_says_what_to_fix(kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*positive|{field}=.*True or False"):
        AcceleratorConfig(**kwargs)


def test_bad_token_counts_and_methods():
    with pytest.raises(ValueError, match="one count per block"):
        predict(DEIT_T, [197] * 11)
    with pytest.raises(ValueError, match="selection="):
        predict(DEIT_T, [197] * 12, method="mystery")
    assert predict(DEIT_T, [197] * 12, method="mystery", selection="topk").speedup == 1.0


def test_bench_records_tokens_entering_each_mlp():
    import torch

    from vitprune.bench import BenchSettings, run_bench
    from vitprune.models import create_model

    net = create_model("testbed", shared_weights=False)
    example = torch.randn(1, 1, 32, 32)
    result = run_bench(net, "testbed", ["tome:r=4"], None, BenchSettings(measure_speed=False), example)
    base, tome = result.rows
    assert base.extra["tokens_mlp"] == base.tokens_per_layer
    assert tome.extra["tokens_mlp"] == [t - 4 for t in tome.tokens_per_layer]  # ToMe merges before each MLP


def test_cli_reads_a_bench_json(tmp_path):
    from typer.testing import CliRunner

    from vitprune.cli import app

    full = [65.0] * 12
    evit = [65.0] * 4 + [47.0] * 3 + [35.0] * 3 + [26.0] * 2
    rows = [
        dict(model="testbed", method="none", config="unpatched", gmacs=0.365, macs_ratio=1.0, speedup=1.0,
             tokens_per_layer=full, extra={"spec": "none", "tokens_mlp": full}),
        dict(model="testbed", method="evit", config="keep=0.7@3,6,9", gmacs=0.247, macs_ratio=1.48, speedup=1.43,
             tokens_per_layer=evit, extra={"spec": "evit:keep=0.7", "tokens_mlp": evit[1:] + [26.0]}),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    runner = CliRunner()
    out = runner.invoke(app, ["hw", "--bench-json", str(path), "--pe-cols", "32"])
    assert out.exit_code == 0, out.output
    assert "32×32 int8 MACs" in out.output and "1.00×" in out.output and "1.43×" in out.output
    bad = runner.invoke(app, ["hw", "--bench-json", str(path), "--pe-rows", "0"])
    assert bad.exit_code != 0 and "pe_rows" in bad.output
    calib = runner.invoke(app, ["hw", "--calibration"])
    assert calib.exit_code == 0 and "heatvit-like" in calib.output


def test_cli_runs_the_forward_itself():
    from typer.testing import CliRunner

    from vitprune.cli import app

    out = CliRunner().invoke(app, ["hw", "--model", "vit_tiny_patch16_224", "-m", "tome:r=8", "-m",
                                   "togo:keep=0.5,group=1", "--batch-size", "1"])
    assert out.exit_code == 0, out.output
    assert "tome" in out.output and "togo" in out.output and "1.00×" in out.output
