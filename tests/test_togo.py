"""ViT-ToGo: grouped pruning == top-k at 1×1, groups stay whole, schedule, MACs, identity, unpatch, errors, learning."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import vitprune
from vitprune import assets
from vitprune.measure.flops import count_macs, paper_vit_macs
from vitprune.methods.base import ModelInfo
from vitprune.methods.togo import ToGo, ToGoPerTokenTopK, attention_head_weights
from vitprune.patching import METHOD_MODULE
from vitprune.tokens import PACKAGE_INDEX, TokenState

from conftest import make_vit


@functools.lru_cache(maxsize=1)
def _testbed_weights():
    from vitprune.models import create_model

    return create_model("testbed")


def load_testbed():
    try:
        assets.assets_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared assets unavailable: {err}")
    return copy.deepcopy(_testbed_weights())


@functools.lru_cache(maxsize=2)
def _fmnist(split: str, limit: int) -> torch.Tensor:
    from vitprune.measure.data import load_dataset

    paths = assets.testbed_paths()
    return load_dataset(paths.test if split == "test" else paths.train, limit=limit).images


def fmnist_images(n: int, split: str = "test") -> torch.Tensor:
    return _fmnist(split, 500)[:n] if n <= 500 else _fmnist(split, n)


@functools.lru_cache(maxsize=1)
def _deit_tiny():
    return make_vit("deit_tiny_patch16_224")


def deit_tiny():
    """A random-init DeiT-Tiny (built once per session; each test gets its own copy)."""
    return copy.deepcopy(_deit_tiny())


def images(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def fixed_macs(model) -> int:
    """Patch embedding + head MACs (not reduced by token pruning)."""
    pe = model.patch_embed
    return pe.num_patches * model.embed_dim * pe.proj.in_channels * math.prod(pe.patch_size) + (
        model.embed_dim * model.num_classes
    )


def paper_macs(model, trace) -> int:
    return paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, model.embed_dim, fixed_macs(model), 0)


class Recording(ToGo):
    """ToGo that keeps the token positions after each pruning block."""

    def _prune(self, state, importance, stage):
        out = super()._prune(state, importance, stage)
        self.seen.append(out.index.clone())
        return out


def assert_groups_whole(index: torch.Tensor, grid: tuple[int, int], g: int, num_prefix: int = 1) -> None:
    rows, cols = grid
    for row in index.tolist():
        assert row[:num_prefix] == list(range(num_prefix))
        patches = [i - num_prefix for i in row[num_prefix:] if i != PACKAGE_INDEX]
        assert PACKAGE_INDEX not in row[: num_prefix + len(patches)]  # the package token comes last
        assert patches == sorted(patches) and len(set(patches)) == len(patches)  # original order, no repeats
        present = set(patches)
        for p in patches:
            r0, c0 = (p // cols) // g * g, (p % cols) // g * g
            members = {r * cols + c for r in range(r0, min(r0 + g, rows)) for c in range(c0, min(c0 + g, cols))}
            assert members <= present, f"group of patch {p} is incomplete"


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("keep", [0.7, 0.45])
def test_group_1x1_equals_per_token_topk(keep):
    model = load_testbed()
    x = fmnist_images(16)
    outs = []
    with torch.no_grad():
        for method in (ToGo(keep=keep, group=1), ToGoPerTokenTopK(keep=keep, group=1)):
            vitprune.patch(model, method)
            outs.append(model(x))
            tokens = vitprune.last_trace(model).tokens_mlp
    vitprune.unpatch(model)
    k1 = round(keep * 64)
    assert tokens[3] == 1 + k1 and tokens[-1] < tokens[6] < tokens[3]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def reference_selection(index, importance, grid, g, quota_of, score):
    """Per image, per group in Python: groups by original position, ranked within their shape class."""
    rows, cols = grid
    kept = []
    for idx, imp in zip(index.tolist(), importance.tolist()):
        groups: dict[tuple[int, int], list[int]] = {}
        for pos, (i, s) in enumerate(zip(idx[1:], imp[1:]), start=1):
            p = i - 1
            groups.setdefault(((p // cols) // g, (p % cols) // g), []).append(pos)
        by_shape: dict[tuple[int, int], list] = {}
        for (gr, gc), members in groups.items():
            shape = (min(g, rows - gr * g), min(g, cols - gc * g))
            vals = [imp[m] for m in members]
            value = sum(vals) / len(vals) if score == "mean" else max(vals)
            by_shape.setdefault(shape, []).append((value, members))
        keep_pos = []
        for shape, entries in by_shape.items():
            entries.sort(key=lambda e: -e[0])
            for _, members in entries[: quota_of[shape]]:
                keep_pos += members
        kept.append(sorted(idx[m] for m in keep_pos))
    return kept


@pytest.mark.parametrize("grid,g,score", [((5, 7), 2, "mean"), ((5, 7), 3, "max"), ((4, 4), 2, "mean")])
def test_grouped_selection_matches_reference(grid, g, score):
    info = ModelInfo(depth=12, dim=8, num_heads=2, num_prefix=1, grid=grid)
    method = ToGo(keep=[0.6, 0.5], blocks=(3, 6), group=g, group_score=score)
    method.setup(info)
    layout = method.layout(grid)
    n = grid[0] * grid[1]
    state = TokenState.initial(torch.randn(3, 1 + n, 8), 1, grid=grid)
    for layer in (3, 6):
        stage = method.plan(grid)[layer]
        importance = torch.rand(3, state.num_tokens)
        # quota per group shape, from the plan's per-class quotas
        quota_of = {}
        rows, cols = grid
        for gr in range(-(-rows // g)):
            for gc in range(-(-cols // g)):
                shape = (min(g, rows - gr * g), min(g, cols - gc * g))
                cls = int(layout.group_class[gr * -(-cols // g) + gc])
                quota_of[shape] = stage.quotas[cls]
        expected = reference_selection(state.index, importance, grid, g, quota_of, score)
        state = method._prune(state, importance, stage)
        assert state.num_patches == stage.tokens_kept
        assert [row[1:] for row in state.index.tolist()] == expected
        assert_groups_whole(state.index, grid, g)


@pytest.mark.parametrize("g,package", [(2, False), (2, True), (3, True)])
def test_groups_stay_whole_across_stages(g, package):
    model = load_testbed()
    method = Recording(keep=0.7, group=g, package=package)
    method.seen = []
    vitprune.patch(model, method, trace_source=True)
    with torch.no_grad():
        model(fmnist_images(4))
    assert len(method.seen) == 3
    for index in method.seen:
        assert_groups_whole(index, (8, 8), g)
        assert (index[:, -1] == PACKAGE_INDEX).all() == package
    final = model._vitprune.last_state
    assert torch.equal(final.index, method.seen[-1])
    if package:  # kept ∪ package covers every input patch exactly once
        assert torch.equal(final.source.sum(dim=1), torch.ones(4, 65))
        assert torch.equal(final.size[:, -1, 0], 64 - (final.index[:, 1:-1] >= 0).sum(1).float())


# ---------------------------------------------------------------- schedule and cost


def test_token_counts_follow_schedule():
    model = deit_tiny()  # the 14×14 grid of DeiT-S/B
    x = images(model, 1)
    # 49 groups of 2×2: round(0.7·49)=34 groups=136 tokens, then 24 groups=96, then 17 groups=68
    for cfg, expected in [
        ({"keep": 0.7}, [197] * 3 + [137] * 3 + [97] * 3 + [69] * 3),
        ({"keep": 0.7, "package": True}, [197] * 3 + [138] * 3 + [98] * 3 + [70] * 3),
        # round(0.75·49)=37 groups=148 tokens, then round(0.5·37)=19 groups (half up)=76, then keep all
        ({"keep": [0.75, 0.5, 1.0], "blocks": (2, 5, 8)}, [197] * 2 + [149] * 3 + [77] * 7),
        ({"keep": 0.5, "group": 1, "blocks": (0,)}, [99] * 12),
        ({"keep": 0.7, "group": 3}, None),  # 14×14 in 3×3: edge groups, quotas per shape class
    ]:
        vitprune.patch(model, "togo", **cfg)
        with torch.no_grad():
            model(x)
        trace = vitprune.last_trace(model)
        method = model._vitprune.method
        assert (trace.tokens_attn, trace.tokens_mlp) == method.token_schedule(model._vitprune.info)
        if expected is not None:
            assert trace.tokens_mlp == expected, cfg
    # group=3 on 14×14: classes 3×3 (16), 3×2 (4), 2×3 (4), 2×2 (1) → 11·9 + 3·6 + 3·6 + 1·4 = 139 kept
    assert trace.tokens_mlp[3] == 1 + 139


@pytest.mark.parametrize("name,cfg", [
    ("deit_tiny_patch16_224", {"keep": 0.7}),
    ("deit_tiny_patch16_224", {"keep": 0.6, "package": True, "head_weights": "learned", "group": 3}),
])
def test_macs_match_formula(name, cfg):
    model = deit_tiny() if name == "deit_tiny_patch16_224" else make_vit(name)
    vitprune.patch(model, "togo", **cfg)
    count = count_macs(model, images(model, 1))
    trace = vitprune.last_trace(model)
    assert count.macs == pytest.approx(paper_macs(model, trace), rel=0.01)
    planned = model._vitprune.method.planned_macs(model._vitprune.info)  # ModelInfo carries embed and head MACs
    assert count.macs == pytest.approx(planned, rel=0.01)
    vitprune.unpatch(model)
    assert count.macs < 0.75 * count_macs(model, images(model, 1)).macs


DEIT_S = ModelInfo(depth=12, dim=384, num_heads=6, num_prefix=1, grid=(14, 14))


def test_target_macs_sets_one_keep_ratio():
    for target in (0.9, 0.64, 0.5):
        method = ToGo(target_macs=target)
        method.setup(DEIT_S)
        keeps = set(method.keep_at.values())
        assert len(keeps) == 1
        keep = keeps.pop()
        full = method.planned_macs(DEIT_S, {b: 1.0 for b in method.blocks})
        assert method.planned_macs(DEIT_S) <= target * full
        # the largest such ratio: one more group at the first pruning block would exceed the target
        assert method.planned_macs(DEIT_S, {b: min(1.0, keep + 1 / 49) for b in method.blocks}) > target * full
    method = ToGo(target_macs=1.0)
    method.setup(DEIT_S)
    assert set(method.keep_at.values()) == {1.0}


# ---------------------------------------------------------------- identity, unpatch, errors


def test_keep_1_equals_unpatched():
    model = load_testbed()
    x = fmnist_images(4)
    with torch.no_grad():
        ref = model(x)
        for cfg in ({}, {"package": True, "group": 3}, {"head_weights": "learned"}, {"blocks": (0, 11), "group": 1}):
            vitprune.patch(model, "togo", keep=1.0, **cfg)
            out = model(x)
            assert vitprune.last_trace(model).tokens_mlp == [65] * 12
            assert (out - ref).abs().max().item() < 1e-5, cfg
    vitprune.unpatch(model)


def test_unpatch_round_trip_removes_learned_estimator():
    model = load_testbed()
    cls, keys = type(model), set(vars(model))
    sd = copy.deepcopy(model.state_dict())
    n_params = len(list(model.parameters()))
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        vitprune.patch(model, "togo", keep=0.6, head_weights="learned")
        est = list(model._vitprune.method.module.parameters())
        assert {id(p) for p in est} <= {id(p) for p in model.parameters()}
        assert len(list(model.parameters())) == n_params + len(est)
        assert any(k.startswith(METHOD_MODULE + ".") for k in model.state_dict())
        pruned = model(x)
        vitprune.patch(model, "togo", keep=0.6)  # re-patching with a parameter-free config drops the estimator
        assert len(list(model.parameters())) == n_params
        vitprune.patch(model, "togo", keep=0.5, head_weights="learned", package=True)
        vitprune.unpatch(model)
        out = model(x)
    assert not torch.allclose(pruned, ref)
    assert type(model) is cls and set(vars(model)) == keys and not hasattr(model, METHOD_MODULE)
    assert len(list(model.parameters())) == n_params
    assert set(model.state_dict()) == set(sd) and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cfg,match", [
    ({"keep": 0.0}, r"\(0, 1\]"),
    ({"keep": 1.2}, r"\(0, 1\]"),
    ({"keep": [0.5, 0.5]}, "one per block"),
    ({"group": 0}, ">= 1"),
    ({"group": 1.5}, ">= 1"),
    ({"group": 15}, "larger than the 14x14"),
    ({"head_weights": "entropy"}, "head_weights must be one of"),
    ({"group_score": "median"}, "group_score"),
    ({"blocks": (3, 12)}, "do not exist"),
    ({"target_macs": 0.05}, "unreachable"),
    ({"target_macs": 1.5}, r"\(0, 1\]"),
    ({"target_macs": 0.6, "keep": 0.7}, "not both"),
    ({"keep": 0.7, "typo": 1}, "unknown option"),
])
def test_bad_config_leaves_model_untouched(cfg, match):
    model = deit_tiny()
    cls = type(model)
    n_params = len(list(model.parameters()))
    with pytest.raises(ValueError, match=match):
        vitprune.patch(model, "togo", **cfg)
    assert type(model) is cls and not vitprune.is_patched(model)
    assert len(list(model.parameters())) == n_params
    # a patched model stays patched with its old method when a re-patch fails
    vitprune.patch(model, "togo", keep=0.7, head_weights="learned")
    with pytest.raises(ValueError, match=match):
        vitprune.patch(model, "togo", **cfg)
    assert model._vitprune.method.head_weights == "learned" and hasattr(model, METHOD_MODULE)


def test_batch_equals_one_by_one():
    model = load_testbed()
    x = fmnist_images(3)
    for cfg in ({"keep": 0.6}, {"keep": 0.5, "group": 3, "package": True, "group_score": "max"}):
        vitprune.patch(model, "togo", **cfg)
        with torch.no_grad():
            batch = model(x)
            single = torch.cat([model(x[i : i + 1]) for i in range(3)])
        assert (batch - single).abs().max().item() < 1e-4, cfg


# ---------------------------------------------------------------- head importance


def test_attention_head_weights_prefer_concentrated_heads():
    attn = torch.full((1, 3, 16), 1 / 16)
    attn[0, 1] = torch.softmax(torch.arange(16.0), 0)  # focused head
    attn[0, 2] = torch.softmax(torch.arange(16.0) * 0.2, 0)  # a little focused
    w = attention_head_weights(attn)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    assert w[0, 1] > w[0, 2] > w[0, 0] and w[0, 0] < 1e-4


def test_learned_estimator_starts_at_attention_and_trains():
    torch.manual_seed(0)
    teacher = load_testbed()
    student = copy.deepcopy(teacher)
    x_test = fmnist_images(8)
    vitprune.patch(student, "togo", keep=0.5, head_weights="attention")
    with torch.no_grad():
        ref = student(x_test)
    vitprune.patch(student, "togo", keep=0.5, head_weights="learned")
    with torch.no_grad():
        assert (student(x_test) - ref).abs().max().item() < 1e-5  # untrained learned == training-free

    train = fmnist_images(32 * 8, split="train")
    with torch.no_grad():
        t_train = teacher(train)

    def kl(s, t):
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")

    def subset_kl():
        student.eval()
        with torch.no_grad():
            value = kl(student(train), t_train).item()
        student.train()
        return value

    est = getattr(student, METHOD_MODULE)
    before_params = [p.detach().clone() for p in est.parameters()]
    backbone = [p for n, p in student.named_parameters() if not n.startswith(METHOD_MODULE + ".")]
    opt = torch.optim.AdamW([{"params": backbone, "lr": 5e-5}, {"params": est.parameters(), "lr": 3e-3}],
                            weight_decay=0.0)
    before = subset_kl()
    for step in range(16):  # two passes over 8 batches of 32
        i = (step % 8) * 32
        loss = kl(student(train[i : i + 32]), t_train[i : i + 32])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name in ("head_bias", "mlp.2.weight"):
                grads = [p.grad for n, p in est.named_parameters() if n.endswith(name)]
                assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads), name
        opt.step()
    after = subset_kl()
    print(f"distillation KL {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    assert all(not torch.equal(a, p) for a, p in zip(before_params, est.parameters()))  # every part learned
