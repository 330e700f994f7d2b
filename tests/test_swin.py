"""Swin backend (timm SwinTransformer): learned selectors on the kept tokens, window attention on the grid with timm's
bias and shift mask, grid restore before patch merging, training mode, defaults at SPViT's budgets, MACs, unpatch;
clear errors for the methods Swin cannot run and for Swin V2."""
from __future__ import annotations

import pickle

import pytest
import torch

import vitprune
from vitprune.backends.timm_pit import StagedModelInfo
from vitprune.backends.timm_swin import WindowBlockOps, _SwinStage, model_info
from vitprune.measure.flops import count_macs
from vitprune.methods.base import TokenReducer
from vitprune.methods.selector import selector_macs
from vitprune.tokens import TokenState, gather_tokens

from conftest import assert_padded_batch_equals_images_one_by_one, assert_unpatch_is_exact, make_vit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "swin_tiny_patch4_window7_224"
# img_size 112: stage grids 28x28 (16 windows), 14x14 (4), 7x7 (1), 4x4 (1 window of 4x4, unshifted)
SCHEDULE = dict(keep=(0.7, 0.7, 0.5, 0.3, 0.7), blocks=(1, 3, 5, 7, 11))  # stages 0, 1, 2, 2, 3
FULL = [784] * 2 + [196] * 2 + [49] * 6 + [16] * 2


def swin(**kwargs):
    return make_vit(TINY, img_size=112, **kwargs)


@pytest.mark.smoke
def test_reduction_off_equals_unpatched():
    model = swin()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
    # keep everything: tokens come back in score order, so this checks the gathers, the window map and the restore
    vitprune.patch(model, "spvit", keep=1.0, blocks=SCHEDULE["blocks"], package="none")
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert vitprune.last_trace(model).tokens_attn == FULL


def test_model_info_describes_each_stage():
    info = model_info(make_vit(TINY))
    assert isinstance(info, StagedModelInfo) and info.depth == 12 and info.num_prefix == 0 and not info.has_cls
    assert [(s.depth, s.dim, s.num_heads, s.grid) for s in info.stages] == [
        (2, 96, 3, (56, 56)), (2, 192, 6, (28, 28)), (6, 384, 12, (14, 14)), (2, 768, 24, (7, 7))]


@pytest.mark.smoke
@pytest.mark.parametrize("method,packages", [("spvit", "append"), ("heatvit", "update")])
def test_token_counts_per_stage_follow_the_schedule(method, packages):
    model = swin()
    vitprune.patch(model, method, **SCHEDULE)
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112))
    kept = [round(0.7 * 784), round(0.7 * 196), round(0.5 * 49), round(0.3 * 49), round(0.7 * 16)]
    p2 = 2 if packages == "append" else 1  # stage 2 has two selectors
    expect = [784, kept[0] + 1, 196, kept[1] + 1, 49, kept[2] + 1, kept[2] + 1, kept[3] + p2, kept[3] + p2,
              kept[3] + p2, 16, kept[4] + 1]
    assert vitprune.last_trace(model).tokens_attn == expect
    assert [model.vitprune_method[str(b)].num_heads for b in SCHEDULE["blocks"]] == [3, 6, 12, 12, 24]


def _timm_window_attention(block, x_grid: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """timm's own shifted-window attention on the full grid (one image), with keys at positions not ``held``
    masked out through timm's per-window mask argument: the reference for attention on the kept tokens."""
    _, h, w, c = x_grid.shape
    ws, (sh, sw) = block.window_size, block.shift_size
    shifted = torch.roll(block.norm1(x_grid), (-sh, -sw), dims=(1, 2))
    held_shifted = torch.roll(held.view(1, h, w, 1).float(), (-sh, -sw), dims=(1, 2))
    from timm.models.swin_transformer import window_partition, window_reverse

    windows = window_partition(shifted, ws).view(-1, ws[0] * ws[1], c)
    key_held = window_partition(held_shifted, ws).view(-1, 1, ws[0] * ws[1])
    mask = torch.zeros(windows.shape[0], windows.shape[1], windows.shape[1]).masked_fill(key_held == 0, -1e9)
    if block.attn_mask is not None:
        mask = mask + block.attn_mask
    out = window_reverse(block.attn(windows, mask=mask).view(-1, *ws, c), ws, h, w)
    return torch.roll(out, (sh, sw), dims=(1, 2)).reshape(1, h * w, c)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_on_kept_tokens_is_timms_with_pruned_keys_masked(shifted):
    model = swin()
    block = model.layers[1].blocks[int(shifted)]  # 14x14 grid, 4 windows, shift 3 in block 1
    assert bool(any(block.shift_size)) == shifted
    x = torch.randn(1, 196, 192)
    kept = torch.randperm(196)[:120].sort().values.flip(0).unsqueeze(0)  # out of grid order, as selectors leave them
    state = gather_tokens(TokenState.initial(x, 0, grid=(14, 14)), kept)
    stage = _SwinStage(TokenReducer(), 0, (14, 14))  # a method that reduces nothing: the tokens stay as given
    stage.before_attention(0, state, trace=None)  # no selector at layer 0: just records the tokens
    with torch.no_grad():
        out, _ = WindowBlockOps(stage).attention(block, block.norm1(state.x), None)
        held = torch.zeros(196, dtype=torch.bool)
        held[kept[0]] = True
        ref = _timm_window_attention(block, x.view(1, 14, 14, 192), held)[:, kept[0]]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("method,packages", [("spvit", "append"), ("heatvit", "update")])
def test_topk_training_computes_what_fixed_count_inference_runs(method, packages, with_grad):
    """Masked top-k training (static shapes, keep mask as key mask in the windows) and gathered inference must agree;
    with gradient the soft key weights take the explicit masked softmax, without it the additive mask."""
    model = swin()
    vitprune.patch(model, method, package=packages, **SCHEDULE)
    with torch.no_grad():  # heads that disagree, as after training
        for p in model.vitprune_method.parameters():
            p.mul_(2.0)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        ran = model(x)
    model.vitprune_method.train()
    with torch.set_grad_enabled(with_grad):
        trained = model(x)
    assert vitprune.last_trace(model).tokens_attn[-1] > 16  # the training pass kept every position
    torch.testing.assert_close(trained.detach(), ran, atol=1e-4, rtol=0)


def test_training_mode_static_shapes_and_gradients_reach_every_selector():
    model = swin()
    vitprune.patch(model, "spvit", **SCHEDULE)
    model.train()
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    trace = vitprune.last_trace(model)
    assert trace.tokens_attn == [784, 785, 196, 197, 49, 50, 50, 51, 51, 51, 16, 17]  # nothing gathered
    assert set(trace.notes["selector_keep"]) == set(SCHEDULE["blocks"])
    for b in SCHEDULE["blocks"]:
        assert sum(p.grad.abs().sum() for p in model.vitprune_method[str(b)].parameters()) > 0


def test_windows_with_no_kept_token_give_no_nan_forward_or_backward():
    model = swin()
    vitprune.patch(model, "spvit", keep=0.01, blocks=(1,))  # 8 of 784 tokens kept: most of the 16 windows empty
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    model.train()
    model(x).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_adaptive_padding_equals_images_run_one_by_one():
    model = swin()
    vitprune.patch(model, "heatvit", mode="adaptive", blocks=(1, 5, 11), keep=(0.7, 0.7, 0.7))
    x = torch.randn(4, 3, 112, 112)
    last = model.vitprune_method["1"].out_conv[-1]  # stage 0's selector: its padding is restored before merging
    seen = []
    hook = last.register_forward_hook(lambda m, i, o: seen.append((o[..., 0] - o[..., 1]).detach()))
    with torch.no_grad():
        model(x)
        hook.remove()
        # sharpen the keep probabilities and centre them on this batch, so images keep different counts
        last.weight.mul_(20)
        last.bias.mul_(20)
        last.bias[0] -= 20 * seen[0].median()
    assert_padded_batch_equals_images_one_by_one(model, x, layer=1)


def test_fixed_batch_equals_images_one_by_one_and_pickles():
    model = swin()
    vitprune.patch(model, "spvit", **SCHEDULE)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        copy = pickle.loads(pickle.dumps(model))
        again = copy(x)
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(again, batch, atol=0, rtol=0)
    assert vitprune.is_patched(copy)


def test_unpatch_is_exact():
    assert_unpatch_is_exact(swin(), torch.randn(1, 3, 112, 112), "spvit", **SCHEDULE)


def test_macs_counted_from_executed_ops_drop_as_planned():
    """Per-token work (qkv, proj, MLP: 12·C² a token) runs on the kept tokens and the packages; window attention
    stays on the full grid; each selector scores its stage's candidate patch tokens."""
    model = swin()
    x = torch.randn(1, 3, 112, 112)
    base = count_macs(model, x).macs
    vitprune.patch(model, "spvit", **SCHEDULE)
    macs = count_macs(model, x).macs
    tokens = vitprune.last_trace(model).tokens_attn
    dims = [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    expect = base + sum(12 * (n - f) * c * c for n, f, c in zip(tokens, FULL, dims))
    expect += selector_macs(784, 96, 3) + selector_macs(196, 192, 6) + selector_macs(49, 384, 12)
    expect += selector_macs(tokens[5] - 1, 384, 12) + selector_macs(16, 768, 24)
    assert abs(macs - expect) / expect < 0.01
    assert macs < 0.8 * base


@pytest.mark.parametrize("name,budget", [(TINY, 3.47), ("swin_small_patch4_window7_224", 6.35)])
def test_defaults_fit_spvits_swin_budgets_in_executed_macs(name, budget):
    model = make_vit(name)
    x = torch.randn(1, 3, 224, 224)
    vitprune.patch(model, "spvit")  # no keep, no blocks: the Swin defaults
    method = model._vitprune.method
    assert method.blocks == ((5, 7, 9, 11) if name == TINY else (8, 13, 17, 23))
    gmacs = count_macs(model, x).gmacs
    assert budget - 0.05 < gmacs <= budget  # at the budget, not far under it
    if name == TINY:  # one package token instead of one per selector: at most the same MACs
        vitprune.patch(model, "heatvit")
        assert model._vitprune.method.blocks == method.blocks and count_macs(model, x).gmacs <= gmacs


def test_given_keep_or_blocks_are_not_replaced_by_the_defaults():
    model = swin()
    vitprune.patch(model, "spvit", keep=(0.5, 0.5), blocks=(5, 7))
    assert model._vitprune.method.keep == (0.5, 0.5) and model._vitprune.method.blocks == (5, 7)
    vitprune.patch(model, "spvit", keep=0.5)  # blocks scaled from the 12-block positions, as on any model
    assert model._vitprune.method.blocks == (3, 6, 9)


@pytest.mark.parametrize("method,config", [("tome", dict(r=8)), ("evit", dict(keep=0.7)), ("ppt", {}),
                                           ("togo", dict(keep=0.7))])
def test_training_free_methods_on_swin_raise_clearly(method, config):
    model = swin()
    with pytest.raises(ValueError, match="no CLS token.*windowed.*spvit.*heatvit"):
        vitprune.patch(model, method, **config)
    assert not vitprune.is_patched(model) and type(model).__name__ == "SwinTransformer"


def test_wrong_image_size_is_one_clear_error():
    model = swin()
    vitprune.patch(model, "spvit", **SCHEDULE)
    with pytest.raises(ValueError, match="does not match the model's 112x112"):
        model(torch.randn(1, 3, 224, 224))


def test_swin_v2_raises_with_the_reason():
    model = make_vit("swinv2_tiny_window8_256")
    with pytest.raises(ValueError, match="only timm's Swin \\(v1\\)"):
        vitprune.patch(model, "spvit")
    assert not vitprune.is_patched(model)


def test_vitprune_train_on_swin_writes_selectors_that_load(tmp_path, testbed_assets):
    """`vitprune train` on Swin-T with the default schedule: a real (two-step) selector run on ImageNet images,
    with the token term over the restored grid, then `vitprune.load`."""
    import json

    import numpy as np

    from vitprune.assets import assets_dir
    from vitprune.measure.data import load_dataset
    from vitprune.train.loop import TrainConfig, train

    listed = assets_dir() / "imagenet_val1300" / "dataset.txt"
    if not listed.exists():
        pytest.skip(f"{listed} is missing")
    images = load_dataset(listed, limit=4)  # stored at 227x227: centre-crop to Swin's 224 (timm's Swin is strict)
    crops = torch.stack([images[i][0][:, 1:225, 1:225] for i in range(len(images))])
    data = tmp_path / "imagenet4.npz"
    np.savez(data, x=(crops.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy(),
             y=np.array([images[i][1] for i in range(len(images))]))
    out = tmp_path / "swin"
    result = train(TrainConfig(method="spvit", model=TINY, data=str(data), limit=4, batch_size=2, steps=2,
                               warmup_steps=1, progress=False, log_every=1, out=str(out)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert "tokens" in log[-1] and log[-1]["tokens"] > 0  # the restored grid compared position by position
    model = vitprune.load(TINY, out)
    assert model._vitprune.method.name == "spvit" and model._vitprune.method.blocks == (5, 7, 9, 11)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_padded_grid_matches_timm():
    """A grid the window does not divide: timm pads after the shift and attends to the padding (q/k/v = qkv(0));
    the backend does the same, so reduction off still equals the unpatched model."""
    model = make_vit(TINY, img_size=96)  # grids 24, 12, 6, 3: window 7 pads stages 0 and 1
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        vitprune.patch(model, "spvit", keep=1.0, blocks=(1, 3), package="none")
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
