"""Learned selectors (HeatViT, SPViT): decisions, masked attention, package tokens, inference modes, checkpoints."""
from __future__ import annotations

import pytest
import torch

import vitprune
from vitprune.attention import masked_softmax
from vitprune.measure.flops import count_macs
from vitprune.methods.base import TokenReducer
from vitprune.methods.selector import expected_tokens, gumbel_keep, package, selector_macs, topk_keep
from vitprune.tokens import PACKAGE_INDEX, TokenState

from conftest import assert_padded_batch_equals_images_one_by_one, make_vit


def small_vit():
    return make_vit("vit_tiny_patch16_224", img_size=64, depth=6, num_classes=10)


def test_gumbel_decisions_are_hard_and_carry_gradient():
    logits = torch.randn(4, 20, 2, requires_grad=True)
    keep = gumbel_keep(torch.log_softmax(logits, -1))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    (keep * torch.arange(20.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_topk_decisions_keep_exactly_k_of_the_kept_and_carry_gradient():
    logits = torch.randn(4, 20, 2, requires_grad=True)
    prev = (torch.rand(4, 20) > 0.3).float()
    prev[:, :6] = 1.0  # at least 6 still kept per image
    keep = topk_keep(torch.softmax(logits, -1)[..., 0], prev, 5)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.all(keep.detach().sum(dim=1) == 5) and torch.all(keep.detach() <= prev)
    (keep * torch.arange(20.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("method,packages", [("heatvit", "update"), ("spvit", "append")])
def test_topk_training_computes_what_fixed_count_inference_runs(method, packages):
    """Masked top-k training (static shapes) and gathered inference must agree, or the selectors are trained for
    a different network than the one that runs."""
    model = small_vit()
    vitprune.patch(model, method, keep=(0.7, 0.4, 0.2), blocks=(1, 3, 4), package=packages)
    with torch.no_grad():  # heads that disagree, as after training (random init scores every token about alike)
        for p in model.vitprune_method.parameters():
            p.mul_(2.0)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ran = model(x)
        model.vitprune_method.train()
        trained = model(x)
    assert vitprune.last_trace(model).tokens_attn[-1] > 16  # the training pass kept every position
    assert torch.allclose(trained, ran, atol=1e-4)


def test_masked_softmax_is_softmax_over_kept_keys():
    logits = torch.randn(2, 3, 7, 7)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 0, 0]], dtype=torch.float)
    attn = masked_softmax(logits, keep)
    for b in range(2):
        kept = keep[b].bool()
        for i in range(7):
            cols = kept.clone()
            cols[i] = True  # a token always sees itself
            expect = torch.zeros(3, 7)
            expect[:, cols] = logits[b, :, i, cols].softmax(-1)
            torch.testing.assert_close(attn[b, :, i], expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_softmax(logits, torch.ones(2, 7)), logits.softmax(-1), atol=1e-5, rtol=0)


class AllKept(TokenReducer):
    """Masked attention with every token kept, from block 0 on."""

    name = "all_kept"

    def before_attention(self, layer, state, trace):
        if layer == 0:
            return TokenState(state.x, state.num_prefix, state.size, state.source, state.index, state.grid,
                              torch.ones(state.x.shape[:2], requires_grad=True))
        return state


def test_masked_attention_with_all_ones_keep_equals_unpatched():
    model = small_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    vitprune.patch(model, AllKept())
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_package_is_weighted_average_of_dropped_tokens():
    x = torch.randn(2, 5, 4)
    w = torch.tensor([[0.0, 0.2, 0.0, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = package(x, w)
    torch.testing.assert_close(p[0], (0.2 * x[0, 1] + 0.6 * x[0, 3]) / 0.8, atol=1e-5, rtol=0)
    assert torch.all(p[1] == 0)  # nothing dropped: an empty package


@pytest.mark.parametrize("method,packages", [("heatvit", 1), ("spvit", 3)])
def test_fixed_count_schedule_and_packages(method, packages):
    model = small_vit()
    vitprune.patch(model, method, keep=(0.75, 0.5, 0.25), blocks=(1, 3, 5), trace_source=True)
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    trace = vitprune.last_trace(model)
    assert trace.tokens_attn == expected_tokens({1: 0.75, 3: 0.5, 5: 0.25}, 6, 16, 1,
                                                "update" if method == "heatvit" else "append")
    assert trace.tokens_attn == [17, 1 + 12 + 1, 14, 1 + 8 + (1 if method == "heatvit" else 2),
                                 10 if method == "heatvit" else 11, 1 + 4 + packages]
    state = model._vitprune.last_state
    assert int((state.index[0] == PACKAGE_INDEX).sum()) == packages
    # every input patch is held by exactly one token: kept ones by themselves, dropped ones by a package
    held = state.source[:, 1:].sum(dim=1)
    assert torch.all(held[:, 1:] == 1)
    sizes = state.sizes()[:, 1:, 0].sum(dim=1)
    assert torch.all(sizes == 16)


def test_training_mode_keeps_shapes_and_multiplies_decisions():
    model = small_vit()
    vitprune.patch(model, "spvit", keep=(0.75, 0.5, 0.25), blocks=(1, 3, 5))
    model.train()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    trace = vitprune.last_trace(model)
    assert trace.tokens_attn == [17, 18, 18, 19, 19, 20]  # static: one package appended per stage
    keeps = list(trace.notes["selector_keep"].values())
    for earlier, later in zip(keeps, keeps[1:]):
        assert torch.all(later <= earlier)  # a dropped token stays dropped
    grads = [p.grad for p in model.vitprune_method.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_adaptive_padding_equals_images_run_one_by_one():
    model = small_vit()
    vitprune.patch(model, "heatvit", blocks=(1, 3, 5), mode="adaptive")
    with torch.no_grad():  # push the selector's probabilities around 0.5 so images keep different counts
        last = model.vitprune_method["1"].out_conv[-1]
        last.bias.copy_(torch.tensor([0.0, 0.0]))
        last.weight.mul_(50)
    assert_padded_batch_equals_images_one_by_one(model, torch.randn(6, 3, 64, 64), layer=1)


def test_selector_macs_counted_from_executed_ops():
    model = small_vit()
    base = count_macs(model, torch.randn(1, 3, 64, 64)).macs
    vitprune.patch(model, "heatvit", keep=(0.75, 0.5, 0.25), blocks=(1, 3, 5))
    macs = count_macs(model, torch.randn(1, 3, 64, 64)).macs
    tokens = vitprune.last_trace(model).tokens_attn
    c, n0 = 192, 17
    block = lambda n: 4 * n * c * c + 2 * n * n * c + 8 * n * c * c  # noqa: E731  (DESIGN §3, mlp_ratio 4)
    expect = base - 6 * block(n0) + sum(block(n) for n in tokens)
    expect += sum(selector_macs(tokens[b] - 1 - 1 * (b > 1), c, 3) for b in (1, 3, 5))
    assert abs(macs - expect) / expect < 0.01


@pytest.mark.parametrize("bad", [dict(keep=(0.5, 0.7)), dict(keep=1.5), dict(blocks=(0, 3)), dict(mode="soft"),
                                 dict(threshold=1.0), dict(blocks=(2, 9)),
                                 dict(decisions="soft"), dict(mode="adaptive", decisions="topk")])
def test_bad_config_is_one_clear_error_and_model_untouched(bad):
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"blocks": (1, 3), "keep": (0.7, 0.5), **bad}
    with pytest.raises(ValueError):
        vitprune.patch(model, "heatvit", **config)
    assert not vitprune.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_round_trip_and_unpatch(tmp_path):
    from vitprune.train.checkpoint import save_trained

    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vitprune.patch(model, "heatvit", keep=(0.75, 0.5), blocks=(2, 4))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    save_trained(model, tmp_path / "ck", model_name="test", backbone=False)
    assert (tmp_path / "ck" / "selectors.safetensors").stat().st_size < 200_000  # selectors only
    vitprune.unpatch(model)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = vitprune.load(model, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, atol=0, rtol=0)
    from vitprune.specs import parse_method_spec

    name, config = parse_method_spec(f"ckpt:{tmp_path / 'ck'}")
    assert name == "heatvit" and config["checkpoint"] == str(tmp_path / "ck")
    with pytest.raises(FileNotFoundError):
        vitprune.load(small_vit(), tmp_path / "missing")
    other = make_vit("vit_small_patch16_224", img_size=64, depth=6, num_classes=10)
    with pytest.raises(ValueError):
        vitprune.load(other, tmp_path / "ck")
    assert not vitprune.is_patched(other)


def test_fixed_mode_exports_static_shapes_adaptive_does_not():
    assert vitprune.create_method("heatvit").static_shapes
    assert not vitprune.create_method("heatvit", mode="adaptive").static_shapes
