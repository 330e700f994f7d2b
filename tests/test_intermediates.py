"""``forward_intermediates`` on a patched timm ViT: timm's arguments and outputs, full-grid features for every
method, reduction off == unpatched, batch == one by one, and timm's ``features_only`` wrapper."""
from __future__ import annotations

import pytest
import timm
import torch

import vitprune
from conftest import make_vit

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [
    ("tome", {"r": 8}),
    ("evit", {"keep": 0.7}),
    ("ppt", {}),
    ("togo", {}),
    ("spvit", {}),
    ("heatvit", {}),
]
ARGS = [
    {"indices": 2},
    {"indices": [0, 5, -1], "norm": True},
    {"indices": [3], "output_fmt": "NLC", "return_prefix_tokens": True},
    {"indices": [1, 4], "intermediates_only": True, "stop_early": True},
    {"output_dict": True, "return_prefix_tokens": True, "norm": True},
]


def model():
    return make_vit("deit_tiny_patch16_224", num_classes=10)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224)


def assert_same(a, b, atol=1e-5):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], atol)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, atol)


@pytest.mark.parametrize("kwargs", ARGS)
@pytest.mark.parametrize("method,config", [("tome", {"r": 0}), ("evit", {"keep": 1.0})])
def test_reduction_off_gives_timms_own_intermediates(method, config, kwargs):
    m, x = model(), images()
    with torch.no_grad():
        ref = m.forward_intermediates(x, **kwargs)
        vitprune.patch(m, method, **config)
        out = m.forward_intermediates(x, **kwargs)
    assert_same(out, ref)


@pytest.mark.parametrize("method,config", METHODS)
def test_every_method_returns_full_grid_features(method, config):
    m, x = model(), images()
    vitprune.patch(m, method, **config)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x, indices=[2, 11], return_prefix_tokens=True)
        logits = m.forward_head(final)
        want = m(x)
    assert [tuple(f.shape) for f, _ in feats] == [(2, 192, 14, 14)] * 2
    assert [tuple(p.shape) for _, p in feats] == [(2, 1, 192)] * 2
    assert final.shape[1] < 197  # the final features are the reduced tokens, as forward_features gives them
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)  # forward_head pools them as the model does
    assert all(bool(torch.isfinite(f).all()) for f, _ in feats)
    assert vitprune.last_trace(m).tokens_mlp[-1] == final.shape[1]


@pytest.mark.parametrize("fill", ["similar", "last", "package", "zeros"])
def test_fill_rules_on_pruned_positions(fill):
    """EViT (fused package): held positions carry their token; pruned ones follow ``fill``."""
    m, x = model(), images()
    vitprune.patch(m, "evit", keep=0.5, blocks=(3,))
    with torch.no_grad():
        before = vitprune.unpatch(m).forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        vitprune.patch(m, "evit", keep=0.5, blocks=(3,), trace_source=True)
        after = m.forward_intermediates(x, indices=[3], intermediates_only=True, fill=fill)[0]
        m(x)
    state = m._vitprune.last_state
    kept = torch.zeros(2, 196, dtype=torch.bool).scatter_(1, state.index[:, 1:-1] - 1, True)
    flat_before, flat_after = before.flatten(2).transpose(1, 2), after.flatten(2).transpose(1, 2)
    assert int((~kept).sum()) == 2 * 98
    if fill == "similar":  # the current features of the kept patch most similar to it at block 2's output
        unit = torch.nn.functional.normalize(flat_before, dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~kept.unsqueeze(1), float("-inf"))
        for b in range(2):
            src = sim[b].argmax(-1)[~kept[b]]
            assert bool(kept[b, src].all())
            torch.testing.assert_close(flat_after[b][~kept[b]], flat_after[b][src], atol=0, rtol=0)
    elif fill == "last":  # pruned at block 3: the features of block 2's output, where it was last a token
        torch.testing.assert_close(flat_after[~kept], flat_before[~kept], atol=1e-5, rtol=0)
    elif fill == "zeros":
        assert bool((flat_after[~kept] == 0).all())
    else:
        for b in range(2):
            assert torch.allclose(flat_after[b][~kept[b]], flat_after[b][~kept[b]][0].expand(98, -1))
            assert not bool((flat_after[b][~kept[b]] == 0).all())


@pytest.mark.parametrize("method,config", [("tome", {"r": 8}), ("evit", {"keep": 0.7})])
def test_intermediates_of_a_batch_equal_one_image_at_a_time(method, config):
    m, x = model(), images(3)
    vitprune.patch(m, method, **config)
    with torch.no_grad():
        batch = m.forward_intermediates(x, indices=[4, 11], intermediates_only=True)
        single = [m.forward_intermediates(x[i:i + 1], indices=[4, 11], intermediates_only=True) for i in range(3)]
    for j in range(2):
        torch.testing.assert_close(batch[j], torch.cat([s[j] for s in single]), atol=1e-5, rtol=0)


def test_features_only_model_can_be_patched_and_unpatched():
    net = timm.create_model("deit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(5, 8)).eval()
    x = images()
    with torch.no_grad():
        ref = net(x)
        assert vitprune.patch(net, "tome", r=8) is net and vitprune.is_patched(net)
        out = net(x)
        assert vitprune.last_trace(net).tokens_mlp[-1] < 197
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert not torch.allclose(out[1], ref[1])
        vitprune.unpatch(net)
        torch.testing.assert_close(net(x), ref, atol=0, rtol=0)


def test_selector_training_intermediates_have_gradients():
    m = model().train()
    vitprune.patch(m, "spvit")
    feats = m.forward_intermediates(images(), indices=[11], intermediates_only=True)
    feats[0].square().mean().backward()
    grads = [p.grad for p in m.vitprune_method.parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_bad_arguments_are_clear_errors():
    m = vitprune.patch(model(), "tome", r=8)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(images(), output_fmt="NHWC")
    with pytest.raises(ValueError, match="fill must be one of"):
        m.forward_intermediates(images(), fill="mean")
    with pytest.raises(ValueError, match="attn_mask"):
        m.forward_intermediates(images(), attn_mask=torch.ones(2, 197, 197, dtype=torch.bool))


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224"])
def test_rope_models_intermediates(name):
    """timm Eva (DINOv3, EVA02): reduction off equals timm's own; ToMe gives full-grid features."""
    m = timm.create_model(name, pretrained=False, img_size=112).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = m.forward_intermediates(x, indices=[1, -1], norm=True, return_prefix_tokens=True)
        vitprune.patch(m, "tome", r=0)
        assert_same(m.forward_intermediates(x, indices=[1, -1], norm=True, return_prefix_tokens=True), ref)
        vitprune.patch(m, "tome", r=4)
        _, feats = m.forward_intermediates(x, indices=[1, -1], norm=True, return_prefix_tokens=True)
    assert [f.shape for f, _ in feats] == [f.shape for f, _ in ref[1]]
    assert vitprune.last_trace(m).tokens_mlp[-1] < vitprune.last_trace(m).tokens_attn[0]
