"""PPT (adaptive prune-or-pool): the per-image definition, batch = one by one, schedule, cost, config errors and the
token-count-invariant policy."""
from __future__ import annotations

import math

import pytest
import torch

import vitprune
from vitprune.measure.flops import count_macs, paper_vit_macs
from vitprune.methods.ppt import clamp_r, policy_statistic, pooled_fraction

from conftest import make_vit


pytestmark = pytest.mark.usefixtures("one_thread")


def _assets_or_skip():
    from vitprune import assets

    try:
        return assets.assets_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared assets unavailable: {err}")


def load_testbed(n: int):
    """The real Fashion-MNIST testbed model and ``n`` real test images (strided over the classes)."""
    _assets_or_skip()
    from vitprune.measure.data import load_dataset
    from vitprune.models import create_model

    ds = load_dataset("testbed", limit=n)
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.tensor([ds[i][1] for i in range(n)])
    return create_model("testbed"), x, y


def images(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def first_layer_stats(model, x, **cfg) -> torch.Tensor:
    """Per-image Var(s) at the first reducing block (its input does not depend on the policy)."""
    vitprune.patch(model, "ppt", **cfg)
    with torch.no_grad():
        model(x)
    notes = vitprune.last_trace(model).notes["ppt_var"]
    vitprune.unpatch(model)
    return notes[min(notes)]


def splitting_threshold(stats: torch.Tensor) -> float:
    """A threshold half-way between the two middle statistics, so about half the images pool."""
    v = stats.sort().values
    k = len(v) // 2
    return float((v[k - 1] + v[k]) / 2)


# ---- an independent per-image reference of DESIGN.md §2 -----------------------------------------------------

def reference_tome_merge(x, size, pos, metric, r, p):
    """ToMe's bipartite merge for one image, written out: alternate A/B split over all positions, the prefix is
    neither source nor destination; output = prefix, unmerged A (in order), B (size-weighted averages)."""
    n = x.shape[0]
    a_ids = [i for i in range(0, n, 2) if i >= p]
    b_ids = [i for i in range(1, n, 2) if i >= p]
    m = metric / metric.norm(dim=-1, keepdim=True)
    best, match = (m[a_ids] @ m[b_ids].T).max(dim=-1)
    order = best.argsort(descending=True).tolist()
    merged, unmerged = order[:r], sorted(order[r:])
    dst_x = (x[b_ids] * size[b_ids]).clone()
    dst_s = size[b_ids].clone()
    for s in merged:
        dst_x[match[s]] += x[a_ids[s]] * size[a_ids[s]]
        dst_s[match[s]] += size[a_ids[s]]
    keep = list(range(p)) + [a_ids[i] for i in unmerged]
    return (
        torch.cat([x[keep], dst_x / dst_s]),
        torch.cat([size[keep], dst_s]),
        torch.cat([pos[keep], pos[b_ids]]),
    )


def reference_ppt(model, x, r, blocks, threshold, policy="adaptive", ref_tokens=196):
    """PPT image by image on an unpatched timm model, with the full attention matrix computed explicitly.

    Returns logits [B, K], {layer: [pooled per image]}, {layer: [statistic per image]} (adaptive policies) and
    the final input position of every token [B, N'] (its own, or the one it was merged into).
    """
    p = model.num_prefix_tokens
    logits, decisions, stats, positions = [], {}, {}, []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for t in tokens:
            size = torch.ones(t.shape[0], 1)
            pos = torch.arange(t.shape[0])
            for layer, blk in enumerate(model.blocks):
                attn, n_tok, c = blk.attn, t.shape[0], t.shape[1]
                qkv = attn.qkv(blk.norm1(t)).reshape(n_tok, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
                q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]  # [H, N, D]
                a = ((q @ k.transpose(-1, -2)) * attn.scale + size.log().T).softmax(dim=-1)  # [H, N, N]
                out = attn.norm((a @ v).transpose(0, 1).reshape(n_tok, c))
                t = t + blk.ls1(attn.proj(out))
                rr = min(r, (n_tok - p) // 2, (n_tok + 1) // 2 - (p + 1) // 2)
                if layer in blocks and rr > 0:
                    v_norm = v.transpose(0, 1).reshape(n_tok, c).norm(dim=-1)
                    s = (a[:, 0, :].sum(dim=0) * v_norm)[p:]
                    s = s / s.sum()
                    n = s.shape[0]
                    var = s.var(unbiased=True).item()
                    if policy == "adaptive_invariant":
                        var = var * (n / ref_tokens) ** 2
                    if policy.startswith("adaptive"):
                        stats.setdefault(layer, []).append(var)
                    pooled = {"pool": True, "prune": False}.get(policy, var < threshold)
                    decisions.setdefault(layer, []).append(pooled)
                    if pooled:
                        t, size, pos = reference_tome_merge(t, size, pos, k.mean(dim=0), rr, p)
                    else:
                        keep = torch.cat([torch.arange(p), s.argsort(descending=True)[: n - rr] + p])
                        t, size, pos = t[keep], size[keep], pos[keep]
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            logits.append(model.forward_head(model.norm(t.unsqueeze(0)))[0])
            positions.append(pos)
    return torch.stack(logits), decisions, stats, torch.stack(positions)


def run_ppt(model, x, **cfg):
    """Patched forward → (logits, {layer: [pooled per image]}, {layer: [statistic]}, final token positions)."""
    vitprune.patch(model, "ppt", trace_source=True, **cfg)
    with torch.no_grad():
        out = model(x)
    trace, state = vitprune.last_trace(model), model._vitprune.last_state
    vitprune.unpatch(model)
    decisions = {layer: v.tolist() for layer, v in trace.notes.get("ppt_policy", {}).items()}
    stats = {layer: v.tolist() for layer, v in trace.notes.get("ppt_var", {}).items()}
    return out, decisions, stats, state.index


def assert_matches_reference(model, x, r, blocks, threshold, policy="adaptive"):
    out, decisions, stats, index = run_ppt(model, x, r=r, blocks=blocks, threshold=threshold, policy=policy)
    ref, ref_decisions, ref_stats, ref_index = reference_ppt(model, x, r, blocks, threshold, policy)
    assert decisions == ref_decisions
    assert stats.keys() == ref_stats.keys()
    for layer in stats:  # the unbiased variance, as the reference computes it
        assert stats[layer] == pytest.approx(ref_stats[layer], rel=1e-4)
    assert torch.equal(index, ref_index)  # same tokens, in the same order (descending score when pruned)
    assert (out - ref).abs().max().item() < 1e-4
    return decisions


@pytest.mark.parametrize("policy", ["adaptive", "prune", "pool", "adaptive_invariant"])
def test_testbed_equals_per_image_reference(policy):
    model, x, _ = load_testbed(6)
    r, blocks = 12, (3, 6, 9)
    threshold = 7e-5
    if policy.startswith("adaptive"):  # mixed decisions at the first reducing block
        threshold = splitting_threshold(first_layer_stats(model, x, r=r, blocks=blocks, policy=policy))
    decisions = assert_matches_reference(model, x, r, blocks, threshold, policy)
    if policy.startswith("adaptive"):
        assert any(decisions[3]) and not all(decisions[3])
    else:
        assert all(v == [policy == "pool"] * 6 for v in decisions.values())


@pytest.mark.parametrize("name,kwargs", [("deit_tiny_distilled_patch16_224", {}),
                                         ("vit_small_patch14_reg4_dinov2", {"img_size": 56})])
def test_prefix_tokens_are_never_scored_or_reduced(name, kwargs):
    """Distilled DeiT (CLS + distillation token) and registers (CLS + 4): score over the tokens after the prefix."""
    model = make_vit(name, **kwargs)
    p = model.num_prefix_tokens
    x = images(model, 4)
    r = 6 if p == 5 else 40
    threshold = splitting_threshold(first_layer_stats(model, x, r=r))
    decisions = assert_matches_reference(model, x, r, (3, 6, 9), threshold)
    assert any(decisions[3]) and not all(decisions[3])
    vitprune.patch(model, "ppt", r=r, threshold=threshold, trace_source=True)
    with torch.no_grad():
        model(x)
    state = model._vitprune.last_state
    assert torch.equal(state.index[:, :p], torch.arange(p).expand(4, p))  # prefix first, in order
    assert torch.equal(state.size[:, :p], torch.ones(4, p, 1))


# ---- batches mix both policies -------------------------------------------------------------------------------

def test_mixed_batch_equals_one_by_one():
    model, x, _ = load_testbed(8)
    stats = first_layer_stats(model, x, r=16)
    threshold = splitting_threshold(stats)
    vitprune.patch(model, "ppt", r=16, threshold=threshold, trace_source=True)
    with torch.no_grad():
        batch = model(x)
        trace, state = vitprune.last_trace(model), model._vitprune.last_state
        pooled = trace.notes["ppt_policy"]
        assert set(pooled) == {3, 6, 9} and all(v.dtype == torch.bool and v.shape == (8,) for v in pooled.values())
        assert 0 < int(pooled[3].sum()) < 8  # both policies in one batch
        for i in range(8):
            single = model(x[i : i + 1])
            one = model._vitprune.last_state
            assert (single - batch[i]).abs().max().item() < 1e-4
            notes = vitprune.last_trace(model).notes["ppt_policy"]
            assert all(bool(v[0]) == bool(pooled[layer][i]) for layer, v in notes.items())
            assert torch.equal(one.index[0], state.index[i]) and torch.equal(one.size[0], state.size[i])
            assert torch.equal(one.source[0], state.source[i])
    # pooled images never lose a patch; pruned ones keep sizes and drop the rest (each patch in at most one token)
    covered = state.source.sum(dim=1)
    assert covered.max() <= 1
    assert torch.equal(state.source.sum(dim=2, keepdim=True), state.size)
    all_pooled = torch.stack([v for v in pooled.values()]).all(dim=0)
    assert torch.equal(covered[all_pooled], torch.ones(int(all_pooled.sum()), 65))
    frac = pooled_fraction(trace)
    assert frac[3] == pytest.approx(float(pooled[3].float().mean()))


def test_pool_only_equals_tome_at_those_blocks():
    model = make_vit("deit_small_patch16_224")
    x = images(model, 2)
    out, decisions, _, _ = run_ppt(model, x, policy="pool")
    assert all(all(v) for v in decisions.values())
    vitprune.patch(model, "tome", r=[0, 0, 0, 50, 0, 0, 50, 0, 0, 50])
    with torch.no_grad():
        tome = model(x)
    assert torch.equal(out, tome)


# ---- schedule and cost ---------------------------------------------------------------------------------------

def test_deit_small_tokens_and_macs():
    model = make_vit("deit_small_patch16_224")
    vitprune.patch(model, "ppt")  # r=50 at blocks 3, 6, 9, τ = 7e-5
    count = count_macs(model, images(model, 1))
    trace = vitprune.last_trace(model)
    # r = min(50, (N−1)//2): 197 → 147 → 97 → 97 − min(50, 48) = 49
    assert trace.tokens_mlp == [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3
    assert trace.tokens_attn == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 2
    assert count.gmacs == pytest.approx(2.94, rel=0.01)
    c, pe = model.embed_dim, model.patch_embed
    patch = pe.num_patches * c * pe.proj.in_channels * math.prod(pe.patch_size)
    paper = paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, c, patch, c * model.num_classes)
    assert count.macs == pytest.approx(paper, rel=0.005)


def test_schedules_and_clamp():
    model = make_vit("deit_tiny_patch16_224", img_size=64)  # 16 patches + CLS
    x = images(model, 2)
    for cfg, expected in [
        ({"r": [3, 0, 5], "blocks": (1, 4, 7)}, [17, 14, 14, 14, 14, 14, 14, 9, 9, 9, 9, 9]),
        ({"r": 100, "blocks": (0, 2)}, [9, 9, 5] + [5] * 9),  # clamped to (N−1)//2: 17 → 9 → 5
        ({"r": [2, 6], "blocks": (6, 2)}, [17, 17, 11, 11, 11, 11, 9] + [9] * 5),  # r follows the given order
    ]:
        for policy in ("adaptive", "prune", "pool"):
            vitprune.patch(model, "ppt", policy=policy, **cfg)
            with torch.no_grad():
                model(x)
            assert vitprune.last_trace(model).tokens_mlp == expected, (cfg, policy)
    assert clamp_r(50, 197, 1) == 50 and clamp_r(50, 97, 1) == 48 and clamp_r(50, 99, 2) == 48


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_r0_is_identity(name):
    model = make_vit(name)
    x = images(model, 2)
    with torch.no_grad():
        ref = model(x)
        for policy in ("adaptive", "prune", "pool", "adaptive_invariant"):
            vitprune.patch(model, "ppt", r=0, policy=policy)
            out = model(x)
            assert (out - ref).abs().max().item() < 1e-5
            assert vitprune.last_trace(model).notes == {}
    vitprune.unpatch(model)


def test_train_mode_gradients():
    model = make_vit("deit_tiny_patch16_224", img_size=64, drop_path_rate=0.1).train()
    for threshold in (0.0, float("inf")):  # prune path, pool path
        vitprune.patch(model, "ppt", r=4, threshold=threshold)
        model.zero_grad()
        model(images(model, 2)).sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"r": -1}, ">= 0"),
        ({"r": 2.5}, "int"),
        ({"r": True}, "int"),
        ({"r": [10, 10]}, "one per block"),
        ({"r": [10, -1, 10]}, ">= 0"),
        ({"threshold": -1e-5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "7e-5"}, "threshold"),
        ({"policy": "merge"}, "unknown policy"),
        ({"blocks": (3, 12)}, "do not exist"),
        ({"blocks": (-1, 3)}, "do not exist"),
        ({"ref_tokens": 0}, "ref_tokens"),
    ],
)
def test_bad_config_leaves_model_untouched(cfg, match):
    model = make_vit("deit_tiny_patch16_224", img_size=32)
    cls = type(model)
    with pytest.raises(ValueError, match=match):
        vitprune.patch(model, "ppt", **cfg)
    assert type(model) is cls and not vitprune.is_patched(model)


# ---- the token-count-invariant policy ------------------------------------------------------------------------

def test_invariant_policy_matches_reference_at_196_real_patches():
    """DINOv2 ViT-S/14 on real ImageNet photos at 196×196 px → 14×14 = 196 patch tokens at the first reduction.

    τ is set between the per-image Var(s) of the batch, so the reference decisions are mixed; the invariant
    policy must make exactly the same ones. On the same photos at 224 px (256 patches) its statistic is the
    reference's times (256/196)², i.e. it is a different rule away from 196 tokens."""
    root = _assets_or_skip()
    from timm.data import create_transform

    from vitprune.measure.data import load_dataset
    from vitprune.models import create_model

    model = create_model("dinov2_vits14", dynamic_img_size=True)
    tf = create_transform(input_size=(3, 196, 196), crop_pct=1.0, interpolation="bicubic",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = load_dataset(root / "imagenet_val1300" / "dataset.txt", transform=tf, limit=8)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    cfg = dict(r=50, blocks=(3,))
    stats = first_layer_stats(model, x, **cfg)
    threshold = splitting_threshold(stats)
    ref = run_ppt(model, x, threshold=threshold, **cfg)[1]
    inv = run_ppt(model, x, threshold=threshold, policy="adaptive_invariant", **cfg)[1]
    assert ref == inv
    assert any(ref[3]) and not all(ref[3])
    big = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    ref_stat = first_layer_stats(model, big, **cfg)
    inv_stat = first_layer_stats(model, big, policy="adaptive_invariant", **cfg)
    assert torch.allclose(inv_stat, ref_stat * (256 / 196) ** 2, rtol=1e-6)


def test_invariant_statistic_ignores_token_count():
    """Duplicating every token (same score distribution at 3× the tokens) divides Var(s) by ~9 but leaves the
    invariant statistic Var(n·s)/ref² unchanged up to the unbiased-variance factor 3(n−1)/(3n−1)."""
    s = torch.rand(5, 64).pow(3) + 1e-3
    s = s / s.sum(dim=1, keepdim=True)
    s3 = s.repeat_interleave(3, dim=1) / 3
    ref, ref3 = policy_statistic(s), policy_statistic(s3)
    inv, inv3 = policy_statistic(s, True, 196), policy_statistic(s3, True, 196)
    assert torch.allclose(ref3, ref * (3 * 63) / (3 * 64 - 1) / 9, rtol=1e-4)
    assert torch.allclose(inv3, inv * (3 * 63) / (3 * 64 - 1), rtol=1e-4)
    t = torch.rand(3, 196)
    assert torch.equal(policy_statistic(t, True, 196), policy_statistic(t))  # bit-identical at n = ref_tokens


def test_testbed_policies_sanity():
    """The testbed (64 patch tokens): accuracy well above chance for every policy, and at the first reducing
    block (same input for both) the invariant rule pools every image the reference pools, and more."""
    model, x, y = load_testbed(200)
    acc, pooled = {}, {}
    with torch.no_grad():
        acc["none"] = (model(x).argmax(1) == y).float().mean().item()
        for policy in ("adaptive", "prune", "pool", "adaptive_invariant"):
            vitprune.patch(model, "ppt", r=16, policy=policy)
            acc[policy] = (model(x).argmax(1) == y).float().mean().item()
            pooled[policy] = vitprune.last_trace(model).notes["ppt_policy"]
    assert min(acc.values()) > 0.3, acc
    ref3, inv3 = pooled["adaptive"][3], pooled["adaptive_invariant"][3]
    assert not (ref3 & ~inv3).any()
    assert inv3.sum() > ref3.sum()
