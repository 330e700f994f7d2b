"""Today's encoders through the timm backend: CLIP towers (``norm_pre``, QuickGELU) run every method; SigLIP's MAP
head attends over the reduced tokens with log(size), and without a CLS token the attention-scored methods rank tokens
by the attention they receive. (EVA02/DINOv3/RoPE: tests/test_rope.py.)"""
from __future__ import annotations

import pytest
import timm
import torch

import vitprune
from vitprune.attention import AttentionScores, size_bias
from vitprune.measure.flops import count_macs, paper_vit_macs

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = ["vit_base_patch32_clip_224", "vit_base_patch32_clip_quickgelu_224"]


def clip(name: str):
    return timm.create_model(name, pretrained=False, img_size=96).eval()  # 3x3 patches of 32 px + CLS


@pytest.mark.smoke
@pytest.mark.parametrize("name", CLIP)
def test_clip_reduction_off_equals_unpatched_and_unpatch_is_exact(name: str) -> None:
    model = clip(name)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        reference = model(x)
        for method, cfg in [("tome", {"r": 0}), ("evit", {"keep": 1.0})]:
            vitprune.patch(model, method, **cfg)
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        vitprune.unpatch(model)
        assert type(model) is timm.models.vision_transformer.VisionTransformer
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method,cfg", [("tome", {"r": 2}), ("evit", {"keep": 0.5, "blocks": (3, 6)}),
                                        ("ppt", {"r": 2, "blocks": (3, 6)}), ("togo", {"keep": 0.5, "group": 1}),
                                        ("spvit", {"keep": (0.7, 0.4), "blocks": (3, 6)})])
def test_clip_runs_every_method_batch_equals_image_by_image(method: str, cfg: dict) -> None:
    model = vitprune.patch(clip(CLIP[1]), method, **cfg)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)


def test_clip_macs_match_the_formula() -> None:
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False).eval()
    n, c = 197, 768
    expect = paper_vit_macs([n] * 12, [n] * 12, c, 196 * c * 3 * 16 * 16, c * model.num_classes)
    assert count_macs(model, torch.randn(1, 3, 224, 224)).macs == pytest.approx(expect, rel=0.005)


def siglip():
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=64, depth=4).eval()


@pytest.mark.smoke
def test_siglip_map_head_reduction_off_equals_unpatched() -> None:
    model = siglip()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        vitprune.patch(model, "tome", r=0)
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        vitprune.unpatch(model)
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method,cfg", [("tome", {"r": 3}), ("ppt", {"r": 2, "blocks": (1, 2), "policy": "pool"}),
                                        ("ppt", {"r": 2, "blocks": (1, 2)}), ("evit", {"keep": 0.5, "blocks": (1, 2)}),
                                        ("togo", {"keep": 0.5, "blocks": (1, 2)}),
                                        ("spvit", {"keep": (0.7, 0.5), "blocks": (1, 2)}),
                                        ("heatvit", {"keep": (0.7, 0.5), "blocks": (1, 2)})])
def test_siglip_reduces_and_batch_equals_image_by_image(method: str, cfg: dict) -> None:
    model = vitprune.patch(siglip(), method, **cfg)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)
    assert vitprune.last_trace(model).tokens_mlp[-1] < 16


def test_siglip_map_head_weighs_a_merged_token_by_its_size() -> None:
    """The latent query attends with log(size): two merged copies of a token weigh what two tokens weigh."""
    model = siglip()
    pool = model.attn_pool
    x = torch.randn(1, 5, model.embed_dim)
    doubled = torch.cat([x, x[:, :1]], dim=1)  # token 0 twice, unmerged
    with torch.no_grad():
        expected = pool(doubled)
        model = vitprune.patch(model, "tome", r=0)
        model._vitprune.final_size = torch.tensor([[[2.0], [1.0], [1.0], [1.0], [1.0]]])
        torch.testing.assert_close(model.pool(x), expected, atol=1e-5, rtol=0)


def test_without_cls_tokens_are_ranked_by_the_attention_they_receive() -> None:
    """``received_attn``: the size-weighted mean over queries of their attention rows. A token of size 2 receives
    what its two copies receive together, and as a query it counts twice."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    dup = [torch.cat([t, t[:, :, :1]], dim=2) for t in (q, k, v)]  # token 0 twice
    plain = AttentionScores(*dup, scale=8 ** -0.5, bias=None)
    size = torch.tensor([[[2.0], [1.0], [1.0], [1.0], [1.0]]])
    merged = AttentionScores(q, k, v, scale=8 ** -0.5, bias=size_bias(size, q.dtype))
    expected = plain.received_attn[..., :5].clone()
    expected[..., 0] += plain.received_attn[..., 5]
    torch.testing.assert_close(merged.received_attn, expected, atol=1e-6, rtol=0)
    full = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1).mean(dim=2)
    torch.testing.assert_close(AttentionScores(q, k, v, scale=8 ** -0.5, bias=None).received_attn, full)
    assert merged.token_attn(has_cls=True) is merged.cls_attn


def test_evit_on_siglip_keeps_the_tokens_that_receive_most_attention() -> None:
    model = siglip()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # by hand with timm's modules: block 0, then block 1's attention matrix
        h = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        attn = model.blocks[1].attn
        q, k, _ = attn.qkv(model.blocks[1].norm1(h)).reshape(1, 16, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        received = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(dim=(1, 2))[0]  # [16]
        vitprune.patch(model, "evit", keep=0.5, blocks=(1,), fuse=False, trace_source=True)
        model(x)
    assert vitprune.last_trace(model).tokens_mlp == [16, 8, 8, 8]
    assert sorted(model._vitprune.last_state.index[0].tolist()) == sorted(received.topk(8).indices.tolist())
