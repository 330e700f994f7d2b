"""PiT backend (timm PoolingVisionTransformer): learned selectors per stage, grid restore before pooling, MACs,
training mode, unpatch; clear errors for methods PiT cannot run (Swin: tests/test_swin.py)."""
from __future__ import annotations

import pytest
import torch

import vitprune
from vitprune.backends.timm_pit import StagedModelInfo, model_info, restore_grid
from vitprune.measure.flops import count_macs
from vitprune.methods.selector import selector_macs
from vitprune.tokens import PACKAGE_INDEX, TokenState

from conftest import assert_padded_batch_equals_images_one_by_one, assert_unpatch_is_exact, make_vit

SCHEDULE = dict(keep=(0.7, 0.7, 0.5, 0.7), blocks=(1, 3, 6, 9))  # stage 0: 1; stage 1: 3, 6; stage 2: 9


def pit(name: str = "pit_ti_224", **kwargs):
    return make_vit(name, **kwargs)


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["pit_ti_224", "pit_ti_distilled_224"])
def test_reduction_off_equals_unpatched(name):
    model = pit(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    # keep everything: tokens come back in score order, so this checks the engine path and the grid restore
    vitprune.patch(model, "spvit", keep=1.0, blocks=SCHEDULE["blocks"], package="none")
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    prefix = 2 if "distilled" in name else 1  # CLS (+ distillation token)
    assert vitprune.last_trace(model).tokens_attn == [729 + prefix] * 2 + [196 + prefix] * 6 + [49 + prefix] * 4


def test_model_info_describes_each_stage():
    info = model_info(pit())
    assert isinstance(info, StagedModelInfo) and info.depth == 12
    assert [(s.depth, s.dim, s.num_heads, s.grid) for s in info.stages] == [
        (2, 64, 2, (27, 27)), (6, 128, 4, (14, 14)), (4, 256, 8, (7, 7))]


@pytest.mark.smoke
@pytest.mark.parametrize("method,packages", [("spvit", "append"), ("heatvit", "update")])
def test_token_counts_per_stage_follow_the_schedule(method, packages):
    model = pit()
    vitprune.patch(model, method, **SCHEDULE)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    p1 = 2 if packages == "append" else 1  # stage 1 has two selectors
    kept = [round(0.7 * 729), round(0.7 * 196), round(0.5 * 196), round(0.7 * 49)]
    expect = [730, 1 + kept[0] + 1, 197, 1 + kept[1] + 1, 1 + kept[1] + 1, 1 + kept[1] + 1,
              1 + kept[2] + p1, 1 + kept[2] + p1, 50, 1 + kept[3] + 1, 1 + kept[3] + 1, 1 + kept[3] + 1]
    assert vitprune.last_trace(model).tokens_attn == expect
    selectors = model.vitprune_method
    assert [selectors[str(b)].num_heads for b in SCHEDULE["blocks"]] == [2, 4, 4, 8]  # each stage's heads


def test_macs_counted_from_executed_ops_drop_as_planned():
    model = pit()
    x = torch.randn(1, 3, 224, 224)
    base = count_macs(model, x).macs  # unpatched PiT: count_macs freezes parameters while counting
    vitprune.patch(model, "spvit", **SCHEDULE)
    macs = count_macs(model, x).macs
    tokens = vitprune.last_trace(model).tokens_attn
    dims = [64] * 2 + [128] * 6 + [256] * 4
    full = [730] * 2 + [197] * 6 + [50] * 4
    block = lambda n, c: 4 * n * c * c + 2 * n * n * c + 8 * n * c * c  # noqa: E731  (DESIGN §3, mlp_ratio 4)
    expect = base + sum(block(n, c) - block(f, c) for n, f, c in zip(tokens, full, dims))
    # each selector scores the candidate patch tokens (not CLS, not earlier package tokens) with its stage's width
    expect += selector_macs(729, 64, 2) + selector_macs(196, 128, 4) + selector_macs(tokens[5] - 2, 128, 4)
    expect += selector_macs(49, 256, 8)
    assert abs(macs - expect) / expect < 0.01
    assert macs < 0.85 * base


def test_restore_grid_fills_pruned_positions_with_their_package():
    c = 3
    cls, t1, t3, pkg_a, pkg_b = (torch.full((1, c), float(v)) for v in (9, 1, 3, 10, 20))
    x = torch.cat([cls, t3, t1, pkg_a, pkg_b]).unsqueeze(0)  # kept tokens out of order, two packages
    index = torch.tensor([[0, 4, 2, PACKAGE_INDEX, PACKAGE_INDEX]])  # grid positions 3 and 1 (+1 prefix)
    state = TokenState(x=x, num_prefix=1, index=index, grid=(2, 2))
    owner = torch.tensor([[0, 0, 1, 0]])  # position 0 went into package A, position 2 into package B
    prefix, grid = restore_grid(state, owner)
    assert torch.equal(prefix, cls.unsqueeze(0))
    assert grid.shape == (1, c, 2, 2)
    assert grid[0, 0].flatten().tolist() == [10.0, 1.0, 20.0, 3.0]
    # no package token: pruned positions are zero
    _, grid = restore_grid(TokenState(x=x[:, :3], num_prefix=1, index=index[:, :3], grid=(2, 2)), None)
    assert grid[0, 0].flatten().tolist() == [0.0, 1.0, 0.0, 3.0]


def test_training_mode_static_shapes_and_gradients_reach_every_selector():
    model = pit(img_size=112)  # grids 13x13 → 7x7 → 4x4
    vitprune.patch(model, "spvit", **SCHEDULE)
    model.train()
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    trace = vitprune.last_trace(model)
    assert trace.tokens_attn == [170, 171, 50, 51, 51, 51, 52, 52, 17, 18, 18, 18]  # nothing gathered
    assert set(trace.notes["selector_keep"]) == set(SCHEDULE["blocks"])
    grads = [p.grad for p in model.vitprune_method.parameters()]
    assert all(g is not None for g in grads)
    for b in SCHEDULE["blocks"]:
        assert sum(p.grad.abs().sum() for p in model.vitprune_method[str(b)].parameters()) > 0


def test_adaptive_padding_equals_images_run_one_by_one():
    model = pit(img_size=112)
    vitprune.patch(model, "heatvit", mode="adaptive", blocks=(1, 3, 9), keep=(0.7, 0.7, 0.7))
    x = torch.randn(4, 3, 112, 112)
    first = model.vitprune_method["1"].out_conv[-1]  # stage 0's selector: its padding is restored before pooling
    seen = []
    hook = first.register_forward_hook(lambda m, i, o: seen.append((o[..., 0] - o[..., 1]).detach()))
    with torch.no_grad():
        model(x)
        hook.remove()
        # sharpen the keep probabilities and centre them on this batch, so images keep different counts
        first.weight.mul_(20)
        first.bias.mul_(20)
        first.bias[0] -= 20 * seen[0].median()
    assert_padded_batch_equals_images_one_by_one(model, x, layer=1)


def test_unpatch_is_exact():
    assert_unpatch_is_exact(pit(), torch.randn(1, 3, 224, 224), "spvit", **SCHEDULE)


def test_keep_may_rise_again_after_a_pooling_layer_but_not_within_a_stage():
    vitprune.patch(pit(), "spvit", keep=(0.5, 0.9), blocks=(3, 9))  # stage 1 then stage 2: fine
    model = pit()
    with pytest.raises(ValueError, match="must not increase"):
        vitprune.patch(model, "spvit", keep=(0.5, 0.9), blocks=(3, 6))
    assert not vitprune.is_patched(model)


@pytest.mark.parametrize("method,config", [("tome", dict(r=8)), ("evit", dict(keep=0.7)), ("ppt", {}),
                                           ("togo", dict(keep=0.7))])
def test_training_free_methods_on_pit_raise_clearly(method, config):
    model = pit()
    with pytest.raises(ValueError, match="spvit.*heatvit"):
        vitprune.patch(model, method, **config)
    assert not vitprune.is_patched(model) and type(model).__name__ == "PoolingVisionTransformer"


def test_vitprune_train_on_pit_writes_selectors_that_load(tmp_path, testbed_assets):
    """`vitprune train` on PiT: a real (two-step) selector run on ImageNet images, then `vitprune.load`."""
    import json

    from vitprune.assets import assets_dir
    from vitprune.train.loop import TrainConfig, train

    data = assets_dir() / "imagenet_val1300" / "dataset.txt"
    if not data.exists():
        pytest.skip(f"{data} is missing")
    torch.manual_seed(0)
    out = tmp_path / "pit"
    result = train(TrainConfig(method="spvit", model="pit_ti_224", data=str(data), limit=4, batch_size=2, steps=2,
                               warmup_steps=1, progress=False, log_every=1, out=str(out)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert "tokens" not in log[-1]  # PiT's forward_features returns only CLS: no token-by-token term
    model = vitprune.load("pit_ti_224", out)
    assert model._vitprune.method.name == "spvit"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
