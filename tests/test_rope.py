"""timm ``Eva`` models (EVA02, DINOv3, RoPE ViTs): rotary positions follow their tokens.

Reference tests run timm's own blocks on the tokens vitprune kept or merged, with the rope rows of those tokens, and
compare; the merged-position rule (circular mean of the held patches' angles) is checked to be order-free.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitprune
from vitprune.backends.timm_eva import unit_rotation
from vitprune.measure.flops import count_macs, paper_vit_macs
from vitprune.tokens import PACKAGE_INDEX, TokenState, append_token, merge_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

ROPE_MODELS = {  # small versions of the acceptance models: their blocks, attention and rope, fewer layers/pixels
    "eva02_small_patch14_224": dict(depth=4, img_size=84),  # abs pos + rope, SwiGLU, sub-LN, interleaved rope
    "vit_small_patch16_dinov3": dict(depth=4, img_size=96),  # 4 registers, LayerScale, DINOv3 rope, half layout
    "vit_base_patch16_rope_224": dict(depth=4, img_size=96, embed_dim=192, num_heads=3),  # AttentionRope
}


def rope_model(name: str) -> torch.nn.Module:
    """Random init with LayerScale at 1 (timm's 1e-5 would hide the blocks) and a random head."""
    model = timm.create_model(name, pretrained=False, **ROPE_MODELS[name]).eval()
    with torch.no_grad():
        for block in model.blocks:
            for gamma in (block.gamma_1, block.gamma_2):
                if gamma is not None:
                    gamma.fill_(1.0)
    return model


def images(model: torch.nn.Module, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, *model.patch_embed.img_size)


@pytest.mark.smoke
@pytest.mark.parametrize("name", list(ROPE_MODELS))
def test_reduction_off_equals_unpatched_and_unpatch_is_exact(name: str) -> None:
    model = rope_model(name)
    cls = type(model)
    x = images(model, 2)
    with torch.no_grad():
        reference = model(x)
        for method, cfg in [("tome", {"r": 0}), ("evit", {"keep": 1.0, "blocks": (1, 2)})]:
            vitprune.patch(model, method, **cfg)
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        vitprune.unpatch(model)
        assert type(model) is cls
        assert torch.equal(model(x), reference)


METHODS = [("tome", {"r": 4}), ("evit", {"keep": 0.6, "blocks": (1, 2)}), ("ppt", {"r": 4, "blocks": (1, 2)}),
           ("togo", {"keep": 0.6, "blocks": (1, 2)}), ("spvit", {"keep": (0.7, 0.5), "blocks": (1, 2)}),
           ("heatvit", {"keep": (0.7, 0.5), "blocks": (1, 2)})]


@pytest.mark.parametrize("name", list(ROPE_MODELS))
@pytest.mark.parametrize("method,cfg", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_batch_equals_image_by_image(name: str, method: str, cfg: dict) -> None:
    model = vitprune.patch(rope_model(name), method, **cfg)
    x = images(model)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)
    assert vitprune.last_trace(model).tokens_mlp[-1] < model.patch_embed.num_patches + model.num_prefix_tokens


def timm_reference(model: torch.nn.Module, x: torch.Tensor, layer: int, reduce) -> torch.Tensor:
    """The unpatched model run block by block with timm's own code; after ``layer``'s attention residual,
    ``reduce(h, rope) -> (h, rope [B, 1, N', 2D], attn_mask or None)`` changes the tokens and their rotary rows."""
    h = model.patch_embed(x)
    h, rope = model._pos_embed(h)
    h = model.norm_pre(h)
    mask = None
    for i, block in enumerate(model.blocks):
        a = block.attn(block.norm1(h), rope=rope, attn_mask=mask)
        h = h + (a if block.gamma_1 is None else block.gamma_1 * a)
        if i == layer:
            h, rope, mask = reduce(h, rope)
        m = block.mlp(block.norm2(h))
        h = h + (m if block.gamma_2 is None else block.gamma_2 * m)
    return model.norm(h)


@pytest.mark.parametrize("name", list(ROPE_MODELS))
def test_pruned_tokens_keep_their_own_rotary_position(name: str) -> None:
    """EViT without the fused token at block 1: timm's blocks on the kept tokens, each with its own rope row."""
    model = rope_model(name)
    x = images(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        vitprune.patch(model, "evit", keep=0.4, blocks=(1,), fuse=False, trace_source=True)
        ours = model.forward_features(x)
        kept = model._vitprune.last_state.index  # [B, N'] input positions of the surviving tokens, prefix first
        vitprune.unpatch(model)
        assert bool((kept[:, p:] != torch.arange(p, p + kept.shape[1] - p)).any())  # really not the first slots

        def prune(h, rope):
            h = h.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            return h, rope[kept[:, p:] - p].unsqueeze(1), None

        reference = timm_reference(model, x, 1, prune)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ROPE_MODELS))
def test_merged_tokens_rotate_by_the_circular_mean_of_their_patches(name: str) -> None:
    """ToMe at block 1: timm's blocks on the size-weighted merged tokens, each rotated by the circular mean angle of
    the patches it holds (built here from the source map and timm's rope table), with log(size) as attn_mask."""
    model = rope_model(name)
    x = images(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        vitprune.patch(model, "tome", r=[0, 12, 0, 0], trace_source=True)  # merge at block 1 only
        ours = model.forward_features(x)
        state = model._vitprune.last_state
        source, size = state.source, state.size  # [B, N', N0], [B, N', 1]
        assert int(size.max()) >= 2
        vitprune.unpatch(model)

        def merge(h, rope):
            h = (source @ h) / size  # size-weighted mean of the held tokens (each of size 1 before block 1)
            table = torch.cat([torch.zeros(p, rope.shape[-1]), rope], dim=0)  # prefix rows unused
            mean = (source[:, p:] @ table) / size[:, p:]  # mean (sin, cos) of the held patches
            return h, unit_rotation(mean).unsqueeze(1), size.log().transpose(1, 2).unsqueeze(1)

        reference = timm_reference(model, x, 1, merge)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_merged_position_does_not_depend_on_order_destination_or_merge_sequence() -> None:
    """Three tokens at angles a, b, c merged as (a+b)+c, (c+a)+b with the destinations swapped: one rotation, the
    circular mean; tokens at the same angle keep it exactly."""
    angles = torch.tensor([0.3, 1.1, 2.0, 0.7])
    pos = torch.stack([angles.sin(), angles.cos()], dim=-1).unsqueeze(0)  # [1, 4, 2]
    state = TokenState.initial(torch.randn(1, 4, 8), 0, pos=pos)

    def merge_into(src: int, dst: int):
        def merge(t: torch.Tensor, mode: str) -> torch.Tensor:
            out = t.clone()
            out[:, dst] = t[:, dst] + t[:, src] if mode == "sum" else torch.maximum(t[:, dst], t[:, src])
            return torch.cat([out[:, :src], out[:, src + 1:]], dim=1)

        def layout(t: torch.Tensor, mode: str) -> torch.Tensor:
            return torch.cat([t[:, :src], t[:, src + 1:]], dim=1)

        return merge, layout

    def angle_of(s: TokenState, row: int) -> float:
        sin, cos = unit_rotation(s.pos)[0, row]
        return float(torch.atan2(sin, cos))

    one = merge_tokens(merge_tokens(state, *merge_into(1, 0)), *merge_into(1, 0))  # b into a, then c into ab
    two = merge_tokens(merge_tokens(state, *merge_into(0, 2)), *merge_into(1, 0))  # a into c, then ca into b
    expected = float(torch.atan2(angles[:3].sin().mean(), angles[:3].cos().mean()))
    assert angle_of(one, 0) == pytest.approx(expected, abs=1e-6)
    assert angle_of(two, 0) == pytest.approx(expected, abs=1e-6)
    assert angle_of(one, 1) == pytest.approx(0.7, abs=1e-6)  # the untouched token keeps its angle
    same = TokenState.initial(torch.randn(1, 2, 8), 0, pos=pos[:, :1].expand(1, 2, 2))
    assert torch.equal(unit_rotation(merge_tokens(same, *merge_into(1, 0)).pos), unit_rotation(pos[:, :1]))


def test_package_tokens_have_no_rotation() -> None:
    """A package holds patches from all over the image: identity rotation, like the prefix tokens."""
    s = TokenState.initial(torch.randn(2, 3, 4), 1, pos=torch.randn(2, 3, 6))
    s = append_token(s, torch.randn(2, 4), torch.ones(2), None, torch.full((2,), PACKAGE_INDEX))
    assert torch.equal(s.pos[:, -1], torch.tensor([0.0, 0, 0, 1, 1, 1]).expand(2, 6))
    assert torch.equal(unit_rotation(s.pos[:, -1:]), s.pos[:, -1:])


@pytest.mark.parametrize("name", ["eva02_small_patch14_224", "vit_small_patch16_dinov3"])
def test_macs_match_the_formula(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    model = vitprune.patch(model, "tome", r=0)
    info = model._vitprune.info
    x = images(model, 1)
    n = info.num_tokens
    expect = paper_vit_macs([n] * info.depth, [n] * info.depth, info.dim, info.patch_embed_macs, info.head_macs,
                            mlp_ratio=info.mlp_ratio)
    assert count_macs(model, x).macs == pytest.approx(expect, rel=0.005)
    vitprune.patch(model, "tome", r=8)
    count_macs(model, x)
    trace = vitprune.last_trace(model)
    expect = paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, info.dim, info.patch_embed_macs, info.head_macs,
                            mlp_ratio=info.mlp_ratio)
    assert count_macs(model, x).macs == pytest.approx(expect, rel=0.005)


def test_mixed_rope_is_refused_with_the_reason() -> None:
    model = timm.create_model("vit_base_patch16_rope_mixed_224", pretrained=False, depth=2, img_size=64).eval()
    with pytest.raises(ValueError, match="mixed"):
        vitprune.patch(model, "tome", r=2)
    assert not vitprune.is_patched(model)


@pytest.mark.parametrize("method,cfg", [("tome", {"r": 4}), ("evit", {"keep": 0.6, "blocks": (1, 2)})])
def test_onnx_export_of_a_rope_model_matches_pytorch(method: str, cfg: dict, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitprune.hw.onnx_export import OrtModule, export_onnx, ort_session

    model = vitprune.patch(rope_model("vit_small_patch16_dinov3"), method, **cfg)
    x = images(model, 2)
    path = export_onnx(model, tmp_path / "m.onnx", sample=x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(OrtModule(ort_session(path, threads=1))(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["spvit", "heatvit"])
def test_selectors_train_on_a_rope_model(method: str) -> None:
    """A short real training run (distillation to the unpatched model): every selector gets a gradient and moves."""
    torch.manual_seed(0)
    model = rope_model("vit_small_patch16_dinov3")
    x = images(model, 4)
    with torch.no_grad():
        teacher = model(x)
    vitprune.patch(model, method, keep=(0.6, 0.4), blocks=(1, 2))
    selectors = model.vitprune_method.train()
    before = [p.detach().clone() for p in selectors.parameters()]
    opt = torch.optim.Adam(selectors.parameters(), lr=1e-3)
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(model(x), teacher)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in selectors.parameters())
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, selectors.parameters()))
    selectors.eval()
    with torch.no_grad():
        model(x)
    assert vitprune.last_trace(model).tokens_attn[-1] < model.patch_embed.num_patches


@pytest.mark.parametrize("name", list(ROPE_MODELS))
@pytest.mark.parametrize("method", ["spvit", "heatvit"])
def test_top_k_training_computes_what_inference_runs(name: str, method: str) -> None:
    """Masked top-k training keeps every token at its slot with its own rope row; inference gathers tokens and rope
    rows. They must compute the same network, or the selectors learn for a model that never runs."""
    model = vitprune.patch(rope_model(name), method, keep=(0.6, 0.4), blocks=(1, 2))
    x = images(model, 3)
    with torch.no_grad():
        for p in model.vitprune_method.parameters():  # heads that disagree, as after training
            p.mul_(2.0)
        ran = model(x)
        model.vitprune_method.train()
        trained = model(x)
    assert vitprune.last_trace(model).tokens_attn[-1] > model.patch_embed.num_patches + model.num_prefix_tokens  # + packages
    torch.testing.assert_close(trained, ran, atol=1e-4, rtol=1e-4)
