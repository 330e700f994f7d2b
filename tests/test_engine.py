"""The token engine inside timm ViTs: identity when off, exact unpatch, schedules, mass, pooling, errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vitprune
from vitprune.methods.tome import bipartite_soft_matching, merge_schedule
from vitprune.tokens import TokenState, merge_tokens

from conftest import make_vit

MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_small_patch14_dinov2", {"img_size": 224}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),  # register tokens: 5 prefix tokens
]
OFF = [("tome", {"r": 0}), ("evit", {"keep": 1.0})]


def images(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


@pytest.mark.smoke
@pytest.mark.parametrize("name,kwargs", MODELS)
def test_reduction_off_equals_unpatched(name, kwargs):
    model = make_vit(name, **kwargs)
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        for method, cfg in OFF:
            vitprune.patch(model, method, **cfg)
            out = model(x)
            vitprune.unpatch(model)
            assert (out - ref).abs().max().item() < 1e-5, (method, name)


@pytest.mark.smoke
@pytest.mark.parametrize("name,kwargs", MODELS[:2])
def test_unpatch_restores_exactly(name, kwargs):
    model = make_vit(name, **kwargs)
    cls, keys = type(model), set(vars(model))
    sd = copy.deepcopy(model.state_dict())
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        vitprune.patch(model, "tome", r=8)
        reduced = model(x)
        vitprune.patch(model, "evit", keep=0.5)  # re-patching replaces the method
        vitprune.unpatch(model)
        out = model(x)
    assert not torch.allclose(reduced, ref)
    assert type(model) is cls and set(vars(model)) == keys and not vitprune.is_patched(model)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(out, ref)


@pytest.mark.smoke
def test_tome_token_counts_follow_schedule():
    model = make_vit("deit_small_patch16_224")
    x = images(model, 1)
    for r, expected_removed in [
        (13, [13] * 12),
        ([4, 0, 8], [4, 0, 8] + [0] * 9),
        ((8, 0.5), merge_schedule(12, (8, 0.5))),
    ]:
        vitprune.patch(model, "tome", r=r)
        with torch.no_grad():
            model(x)
        trace = vitprune.last_trace(model)
        removed = [a - m for a, m in zip(trace.tokens_attn, trace.tokens_mlp)]
        assert removed == expected_removed
        assert trace.tokens_attn[1:] == trace.tokens_mlp[:-1]
    assert merge_schedule(12, (8, 0.5)) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]
    # r is clamped to half the patch tokens, as in ToMe: r=16 ends with 11 tokens on DeiT-S
    vitprune.patch(model, "tome", r=16)
    with torch.no_grad():
        model(x)
    assert vitprune.last_trace(model).tokens_mlp[-1] == 11


def test_evit_token_counts_follow_schedule():
    model = make_vit("deit_small_patch16_224")
    vitprune.patch(model, "evit", keep=0.7, blocks=(3, 6, 9))
    with torch.no_grad():
        model(images(model, 2))
    trace = vitprune.last_trace(model)
    # ceil(0.7·196)=138 kept + CLS + fused; then ceil(0.7·139)=98 (+2); then ceil(0.7·99)=70 (+2)
    assert trace.tokens_mlp == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    vitprune.patch(model, "evit", keep=[0.5, 0.9], blocks=(2, 8), fuse=False)
    with torch.no_grad():
        model(images(model, 1))
    assert vitprune.last_trace(model).tokens_mlp == [197] * 2 + [99] * 6 + [90] * 4


def reference_tome(x: torch.Tensor, metric: torch.Tensor, r: int, distill: bool) -> torch.Tensor:
    """Official ToMe's bipartite matching written out per image (CLS at 0, optional distillation token at 1)."""
    out = []
    for xi, mi in zip(x, metric):
        mi = mi / mi.norm(dim=-1, keepdim=True)
        a_ids, b_ids = list(range(0, len(mi), 2)), list(range(1, len(mi), 2))
        scores = mi[a_ids] @ mi[b_ids].T
        scores[0, :] = -float("inf")
        if distill:
            scores[:, 0] = -float("inf")
        best, match = scores.max(dim=-1)
        order = best.argsort(descending=True)
        merged, kept = order[:r], sorted(order[r:].tolist())
        dst = xi[b_ids].clone()
        count = torch.ones(len(b_ids), 1)
        for s in merged.tolist():
            dst[match[s]] += xi[a_ids[s]]
            count[match[s]] += 1
        dst = dst / count
        unm = xi[[a_ids[k] for k in kept]]
        if distill:
            out.append(torch.cat([unm[:1], dst[:1], unm[1:], dst[1:]]))
        else:
            out.append(torch.cat([unm, dst]))
    return torch.stack(out)


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_bipartite_matching_equals_official_tome(num_prefix):
    x, metric = torch.randn(3, 27, 8), torch.randn(3, 27, 5)
    merge, layout = bipartite_soft_matching(metric, 6, num_prefix)
    state = merge_tokens(TokenState.initial(x, num_prefix), merge, layout)
    assert torch.allclose(state.x, reference_tome(x, metric, 6, distill=num_prefix == 2), atol=1e-6)


def test_merge_conserves_size_weighted_mass():
    x = torch.randn(2, 41, 16)
    state = TokenState.initial(x, num_prefix=1, trace_source=True)
    for r in (10, 7, 5):
        merge, layout = bipartite_soft_matching(torch.randn(2, state.num_tokens, 4), r, 1)
        before = (state.x * state.sizes()).sum(dim=1)
        state = merge_tokens(state, merge, layout)
        assert torch.allclose((state.x * state.size).sum(dim=1), before, atol=1e-4)
    assert torch.equal(state.size.sum(dim=(1, 2)), torch.full((2,), 41.0))
    # every input token is held by exactly one output token, and sizes count them
    assert torch.equal(state.source.sum(dim=1), torch.ones(2, 41))
    assert torch.equal(state.source.sum(dim=2, keepdim=True), state.size)
    assert torch.equal(state.x[:, 0], x[:, 0])  # CLS untouched


def test_avg_pool_is_size_weighted():
    """Merging in the last block with an identity MLP must not change mean-pooled features."""
    model = make_vit("vit_tiny_patch16_224", global_pool="avg", class_token=False, img_size=64)
    last = model.blocks[-1]
    torch.nn.init.zeros_(last.mlp.fc2.weight)
    torch.nn.init.zeros_(last.mlp.fc2.bias)
    x = images(model, 2)
    with torch.no_grad():
        ref = model(x)
        vitprune.patch(model, "tome", r=[0] * 11 + [6])
        out = model(x)
    assert vitprune.last_trace(model).tokens_mlp[-1] == 16 - 6
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.smoke
def test_batch_equals_one_by_one():
    model = make_vit("deit_tiny_patch16_224")
    x = images(model, 3)
    for method, cfg in [("tome", {"r": 13}), ("evit", {"keep": 0.6})]:
        vitprune.patch(model, method, **cfg)
        with torch.no_grad():
            batch = model(x)
            single = torch.cat([model(x[i : i + 1]) for i in range(3)])
        assert (batch - single).abs().max().item() < 1e-4, method


def test_train_mode_gradients_flow_and_bf16_runs():
    model = make_vit("deit_tiny_patch16_224", drop_path_rate=0.1).train()
    for method, cfg in [("tome", {"r": 8}), ("evit", {"keep": 0.7})]:
        vitprune.patch(model, method, **cfg)
        model.zero_grad()
        model(images(model, 2)).sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    model.eval()
    x = images(model, 2)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.float(), ref, dim=-1).min() > 0.98


def test_inference_fast_path_matches_autograd_path():
    """The no-grad fast path (workspace, in-place GELU/residual) gives the same numbers as the module path."""
    model = make_vit("deit_tiny_patch16_224")
    vitprune.patch(model, "tome", r=8)
    x = images(model, 2)
    with torch.inference_mode():
        fast_inference = model(x)
    with torch.no_grad():
        fast_no_grad = model(x)
    reference = model(x)  # grad enabled: module path
    assert torch.equal(fast_inference, fast_no_grad)
    assert (fast_no_grad - reference.detach()).abs().max().item() < 1e-5


def test_dynamic_image_size():
    model = make_vit("deit_tiny_patch16_224", dynamic_img_size=True)
    vitprune.patch(model, "tome", r=4)
    with torch.no_grad():
        model(torch.randn(1, 3, 160, 128))
    assert vitprune.last_trace(model).tokens_attn[0] == 1 + 10 * 8


def test_evit_fused_token_holds_the_pruned_patches():
    model = make_vit("deit_tiny_patch16_224")
    vitprune.patch(model, "evit", keep=0.5, blocks=(2,), trace_source=True)
    with torch.no_grad():
        model(images(model, 2))
    state = model._vitprune.last_state
    assert state.num_tokens == 1 + 98 + 1
    assert torch.equal(state.size[:, -1, 0], torch.full((2,), 98.0))
    assert torch.equal(state.source.sum(dim=1), torch.ones(2, 197))  # kept ∪ fused covers every patch once


# ---- bad input: one clear error, model untouched ------------------------------------------------------------

@pytest.mark.parametrize(
    "method,cfg,match",
    [
        ("nope", {}, "unknown method"),
        ("tome", {"rr": 3}, "unknown option"),
        ("tome", {"r": -1}, ">= 0"),
        ("tome", {"r": [1] * 13}, "12 blocks"),
        ("evit", {"keep": 0.0}, r"\(0, 1\]"),
        ("evit", {"keep": 1.5}, r"\(0, 1\]"),
        ("evit", {"blocks": (3, 12)}, "do not exist"),
        ("evit", {"keep": [0.5, 0.5], "blocks": (3, 6, 9)}, "one per block"),
    ],
)
def test_bad_config_leaves_model_untouched(method, cfg, match):
    model = make_vit()
    cls = type(model)
    with pytest.raises(ValueError, match=match):
        vitprune.patch(model, method, **cfg)
    assert type(model) is cls and not vitprune.is_patched(model)


def test_bad_models_and_inputs():
    with pytest.raises(ValueError, match="unsupported model type"):
        vitprune.patch(torch.nn.Linear(3, 3), "tome", r=1)
    parallel = timm.models.vision_transformer.ParallelScalingBlock
    with pytest.raises(ValueError, match="pre-norm Block"):
        vitprune.patch(make_vit("vit_tiny_patch16_224", block_fn=parallel, img_size=32), "tome", r=1)
    model = make_vit()
    with torch.no_grad():
        model.blocks[3].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vitprune.patch(model, "tome", r=1)
    assert not vitprune.is_patched(model)
    model = vitprune.patch(make_vit(), "tome", r=4)
    with pytest.raises(ValueError, match="resize the images to 224x224"):
        model(torch.randn(1, 3, 160, 160))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 224, 224))
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="not patched"):
        vitprune.unpatch(make_vit())
    with pytest.raises(ValueError, match="resize the images to 224x224"):  # full-grid features check input alike
        model.forward_intermediates(torch.randn(1, 3, 160, 160))
