"""MACs, speed, accuracy and fidelity; the testbed's full accuracy must reproduce its stated top-1."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vitprune import assets
from vitprune.measure.accuracy import evaluate, fidelity
from vitprune.measure.data import load_dataset, make_loader
from vitprune.measure.flops import count_macs, paper_vit_macs
from vitprune.measure.speed import SpeedResult, measure_throughput
from vitprune.models import create_model


def _assets_or_skip() -> None:
    try:
        assets.assets_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared assets unavailable: {err}")


# ---------------------------------------------------------------- MACs


def test_linear_macs_exact() -> None:
    lin = nn.Linear(64, 32)
    assert count_macs(lin, torch.randn(5, 64)).macs == 64 * 32
    tokens = count_macs(lin, torch.randn(3, 10, 64))  # per image: 10 tokens
    assert tokens.macs == 10 * 64 * 32 and tokens.batch_size == 3
    assert tokens.flops == 2 * tokens.macs


def test_conv_macs_exact() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    count = count_macs(conv, torch.randn(2, 3, 16, 16))
    assert count.macs == 16 * 16 * 8 * 3 * 3 * 3
    assert count.per_op == {"convolution": count.macs}
    strided = count_macs(nn.Conv2d(3, 6, kernel_size=4, stride=4, groups=3), torch.randn(1, 3, 16, 16))
    assert strided.macs == 4 * 4 * 6 * 1 * 4 * 4  # grouped: in_ch/groups = 1


def test_count_macs_restores_mode_and_builds_no_graph() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    model[2].eval()
    count_macs(model, torch.randn(4, 8, requires_grad=True))
    assert model.training and model[0].training and not model[2].training
    assert all(p.grad is None for p in model.parameters())


# Whole-model MACs against the DESIGN §3 formula, per attention path: test_op_counting.py.


def test_paper_formula_with_token_reduction() -> None:
    c = 8
    # block 1: 10 tokens everywhere; block 2: 6 tokens attend, 4 reach the MLP
    expected = 5 + 7 + (4 * 10 * c * c + 2 * 100 * c + 8 * 10 * c * c) + (4 * 6 * c * c + 2 * 36 * c + 8 * 4 * c * c)
    assert paper_vit_macs([10, 6], [10, 4], c, 5, 7) == expected
    with pytest.raises(ValueError):
        paper_vit_macs([10], [10, 4], c, 0, 0)


# ---------------------------------------------------------------- speed (no timing assertions)


def test_measure_throughput_fields_and_threads_restored() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = measure_throughput(model, torch.randn(4, 32), threads=2, min_run_time=0.05, warmup=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert isinstance(res, SpeedResult)
    assert (res.batch_size, res.threads, res.dtype, res.device) == (4, 2, "float32", "cpu")
    assert res.img_per_s > 0 and math.isfinite(res.img_per_s)
    assert res.latency_ms_median > 0 and math.isfinite(res.latency_ms_iqr) and res.latency_ms_iqr >= 0
    assert res.runs >= 1
    assert res.img_per_s == pytest.approx(4 / (res.latency_ms_median / 1e3))


# ---------------------------------------------------------------- accuracy and fidelity


class Lookup(nn.Module):
    """Logits are the input itself: lets tests choose predictions exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dummy


def test_evaluate_exact_top1_top5_loss() -> None:
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4], [0, 0, 0, 0, 0, 1]])
    labels = torch.tensor([0, 4, 5, 5])  # top-1 hits: 0 and 3; top-5 hits: 0, 1, 3
    res = evaluate(Lookup(), TensorDataset(logits, labels), batch_size=3, progress=False)
    assert (res.top1, res.top5, res.n) == (0.5, 0.75, 4)
    assert res.loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    loader_res = evaluate(Lookup(), DataLoader(TensorDataset(logits, labels), batch_size=2), progress=True)
    assert loader_res.top1 == 0.5


def test_evaluate_top5_none_for_few_classes_and_empty_rejected() -> None:
    ds = TensorDataset(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 2]))
    res = evaluate(Lookup(), ds, progress=False)
    assert res.top1 == 0.5 and res.top5 is None
    with pytest.raises(ValueError, match="empty"):
        evaluate(Lookup(), TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(Lookup(), [], progress=False)


def test_fidelity() -> None:
    torch.manual_seed(0)
    a = nn.Linear(6, 4).eval()
    b = nn.Linear(6, 4).eval()
    b.load_state_dict(a.state_dict())
    loader = make_loader(TensorDataset(torch.randn(10, 6), torch.zeros(10)), batch_size=4)
    same = fidelity(a, b, loader)
    assert same.cosine_mean == pytest.approx(1.0) and same.top1_agreement == 1.0 and same.max_abs_diff == 0.0
    assert same.n == 10
    with torch.no_grad():
        b.weight.mul_(2)
        b.bias.mul_(2)  # outputs scaled by 2: same direction and argmax, non-zero difference
    scaled = fidelity(a, b, loader)
    assert scaled.cosine_min == pytest.approx(1.0, abs=1e-6) and scaled.top1_agreement == 1.0
    assert scaled.max_abs_diff > 0
    with torch.no_grad():
        b.weight.mul_(-1)
        b.bias.mul_(-1)
    flipped = fidelity(a, b, torch.randn(10, 6).split(5))  # plain tensor batches work too
    assert flipped.cosine_mean == pytest.approx(-1.0) and flipped.top1_agreement == 0.0


# ---------------------------------------------------------------- the testbed


def test_testbed_accuracy_on_a_balanced_subset() -> None:
    _assets_or_skip()
    model = create_model("testbed")
    res = evaluate(model, load_dataset("testbed", limit=500), progress=False)
    assert res.n == 500 and res.top1 > 0.5 and res.top5 is not None and res.top5 >= res.top1


def test_testbed_full_accuracy_matches_stated_top1() -> None:
    """All 5000 test images (~35 s on 2 cores): the model and preprocessing reproduce the JSON's top-1."""
    _assets_or_skip()
    model = create_model("testbed")
    res = evaluate(model, load_dataset(assets.testbed_paths().test), progress=False)
    assert res.n == 5000
    assert res.top1 == pytest.approx(assets.testbed_stated_top1(), abs=0.0005)


def test_count_macs_restores_requires_grad_and_modes():
    from conftest import make_vit
    from vitprune.measure.flops import count_macs

    model = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).train()
    model.blocks[0].requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    count_macs(model, torch.randn(1, 3, 32, 32))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.training
