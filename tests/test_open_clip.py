"""The open_clip backend: CLIP image towers (``clip.visual``) run every method through the shared engine; identity when
off, exact unpatch, open_clip's own blocks as the reference, the paper's MAC formula, size-weighted pooling in every
pooling variant (avg, CoCa's attentional pooler), the whole CLIP's ``encode_image``, selector training, ONNX."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the open_clip backend needs pip install 'vitprune[open_clip]'")

import vitprune  # noqa: E402
from open_clip.model import CLIPVisionCfg, _build_vision_tower  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402
from vitprune.backends.open_clip import masked_attn_pool  # noqa: E402
from vitprune.measure.flops import count_macs, paper_vit_macs  # noqa: E402
from vitprune.tokens import PACKAGE_INDEX  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [("tome", {"r": 4}), ("evit", {"keep": 0.5, "blocks": (3, 6)}), ("ppt", {"r": 4, "blocks": (3, 6)}),
           ("togo", {"keep": 0.5, "group": 1}), ("spvit", {"keep": (0.7, 0.4), "blocks": (3, 6)}),
           ("heatvit", {"keep": (0.7, 0.4), "blocks": (3, 6)})]


@pytest.fixture(scope="module")
def clip():
    """The whole ViT-B-32 CLIP, random init, eval (its tower: 7x7 patches of 32 px + CLS, 12 blocks)."""
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


@pytest.fixture
def visual(clip):
    """ViT-B-32's image tower, unpatched again after the test whatever it did."""
    yield clip.visual
    if vitprune.is_patched(clip.visual):
        vitprune.unpatch(clip.visual)


def tower(**cfg) -> VisionTransformer:
    """A small open_clip tower (96 px, 16 px patches: 6x6 + CLS, 4 blocks of width 64) built as open_clip builds it."""
    quick_gelu, embed_dim = cfg.pop("quick_gelu", False), cfg.pop("embed_dim", 32)
    base = dict(width=64, layers=4, head_width=32, image_size=96, patch_size=16)
    return _build_vision_tower(embed_dim, CLIPVisionCfg(**{**base, **cfg}), quick_gelu=quick_gelu).eval()


def images(batch: int, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# ---- identity, unpatch, pickle ---------------------------------------------------------------------------------

@pytest.mark.smoke
def test_reduction_off_equals_unpatched_and_unpatch_is_exact(visual):
    x = images(2)
    with torch.no_grad():
        reference = visual(x)
        for method, cfg in [("tome", {"r": 0}), ("evit", {"keep": 1.0})]:
            vitprune.patch(visual, method, **cfg)
            torch.testing.assert_close(visual(x), reference, atol=1e-5, rtol=0)
        vitprune.unpatch(visual)
        assert type(visual) is VisionTransformer and not hasattr(visual, "_vitprune")
        assert torch.equal(visual(x), reference)


def test_patched_tower_pickles():
    model = vitprune.patch(tower(), "tome", r=3)
    x = images(2, 96)
    with torch.no_grad():
        out = model(x)
        copy = pickle.loads(pickle.dumps(model))
        assert vitprune.is_patched(copy) and torch.equal(copy(x), out)
        vitprune.unpatch(copy)
        assert type(copy) is VisionTransformer


# ---- every method: batch = image by image, tokens drop --------------------------------------------------------

@pytest.mark.parametrize("method,cfg", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_batch_equals_image_by_image(visual, method, cfg):
    vitprune.patch(visual, method, **cfg)
    x = images(3)
    with torch.no_grad():
        batch = visual(x)
        tokens = vitprune.last_trace(visual).tokens_mlp
        single = torch.cat([visual(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)
    assert tokens[0] <= 50 and tokens[-1] < 50, tokens


# ---- open_clip's own code as the reference ---------------------------------------------------------------------

def run_unpatched_keeping(visual, x: torch.Tensor, layer: int, index: torch.Tensor) -> torch.Tensor:
    """open_clip's own modules, block by block; at ``layer`` only the tokens at ``index`` enter the MLP."""
    h = visual._embeds(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if i != layer:
            h = block(h)
            continue
        h = h + block.ls_1(block.attention(block.ln_1(h)))
        h = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
    pooled, _ = visual._pool(h)
    return pooled @ visual.proj


@pytest.mark.smoke
def test_pruning_equals_open_clips_blocks_on_the_kept_tokens(visual):
    """EViT without fusing only drops tokens: the rest must be computed exactly as open_clip's blocks compute them."""
    x = images(2)
    vitprune.patch(visual, "evit", keep=0.5, blocks=(5,), fuse=False, trace_source=True)
    with torch.no_grad():
        ours = visual(x)
        index = visual._vitprune.last_state.index
        assert index.shape == (2, 1 + 25) and torch.all(index[:, 0] == 0) and not (index == PACKAGE_INDEX).any()
        assert index[0].tolist() != index[1].tolist()  # each image keeps its own tokens
        vitprune.unpatch(visual)
        reference = run_unpatched_keeping(visual, x, 5, index)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# ---- MACs ------------------------------------------------------------------------------------------------------

def test_macs_match_the_formula(visual):
    n, c = 50, 768
    head = 768 * 512  # the projection
    patch = 49 * c * 3 * 32 * 32
    x = images(1)
    assert count_macs(visual, x).macs == pytest.approx(paper_vit_macs([n] * 12, [n] * 12, c, patch, head), rel=0.005)
    vitprune.patch(visual, "evit", keep=0.5, blocks=(3, 6), fuse=False)
    macs = count_macs(visual, x).macs
    trace = vitprune.last_trace(visual)
    assert trace.tokens_mlp[-1] < 20
    expect = paper_vit_macs(trace.tokens_attn, trace.tokens_mlp, c, patch, head)
    assert macs == pytest.approx(expect, rel=0.005)


# ---- the whole CLIP --------------------------------------------------------------------------------------------

def test_encode_image_runs_the_reduced_tower(clip, visual):
    x = images(2)
    with torch.no_grad():
        reference = clip.encode_image(x)
        with pytest.raises(ValueError, match=r"patch its image tower.*model\.visual"):
            vitprune.patch(clip, "tome", r=8)
        assert not vitprune.is_patched(clip)
        vitprune.patch(clip.visual, "tome", r=8)
        reduced = clip.encode_image(x, normalize=True)
        assert vitprune.last_trace(clip.visual).tokens_mlp[-1] < 10
        torch.testing.assert_close(reduced, torch.nn.functional.normalize(clip.visual(x), dim=-1))
        assert not torch.allclose(reduced, torch.nn.functional.normalize(reference, dim=-1), atol=1e-3)
        vitprune.unpatch(clip.visual)
        assert torch.equal(clip.encode_image(x), reference)


# ---- open_clip's tower variants --------------------------------------------------------------------------------

VARIANTS = {
    "quickgelu_layerscale": dict(quick_gelu=True, ls_init_value=0.1),
    "clipa_avg": dict(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
    "avg_ln_before": dict(pool_type="avg"),
    "tokens": dict(output_tokens=True),
    "coca": dict(attentional_pool=True, attn_pooler_queries=6, attn_pooler_heads=2, output_tokens=True),
    # open_clip's 'parallel'/'cascade' layouts (marked WIP there) apply ln_post of the output width to the tower's
    # tokens, so they run only when the two widths are equal
    "parallel": dict(attentional_pool="parallel", attn_pooler_queries=6, attn_pooler_heads=2, output_tokens=True,
                     embed_dim=64),
    "cascade": dict(attentional_pool="cascade", attn_pooler_queries=6, attn_pooler_heads=2, output_tokens=True,
                    embed_dim=64),
}


def outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_off_equal_unpatched_and_reduce_consistently(name):
    model = tower(**VARIANTS[name])
    x = images(3, 96)
    with torch.no_grad():
        reference = outputs(model(x))
        vitprune.patch(model, "tome", r=0)
        for ours, ref in zip(outputs(model(x)), reference):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        vitprune.patch(model, "tome", r=5)
        batch = outputs(model(x))
        single = [torch.cat(parts) for parts in zip(*[outputs(model(x[i:i + 1])) for i in range(3)])]
        assert vitprune.last_trace(model).tokens_mlp == [32, 27, 22, 17]
        for ours, alone in zip(batch, single):  # the pooled embedding, and the tokens where the tower returns them
            torch.testing.assert_close(ours, alone, atol=1e-4, rtol=1e-4)
        vitprune.unpatch(model)
        for ours, ref in zip(outputs(model(x)), reference):
            assert torch.equal(ours, ref)


def test_avg_pool_weighs_a_merged_token_by_its_size():
    """CLIPA's average: a token standing for 2 patches counts twice (like its two unmerged copies)."""
    model = tower(pool_type="avg", final_ln_after_pool=True)
    x = torch.randn(1, 5, 64)
    doubled = torch.cat([x, x[:, 1:2]], dim=1)  # patch token 1 twice, unmerged
    with torch.no_grad():
        expected, _ = model._pool(doubled)
        vitprune.patch(model, "tome", r=0)
        model._vitprune.final_size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [1.0]]])
        pooled, _ = model._pool(x)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["coca", "parallel"])
def test_attentional_pooler_weighs_a_merged_token_by_its_size(name):
    """The pooler's queries attend with log(size): two merged copies weigh what two tokens weigh."""
    model = tower(**VARIANTS[name])
    x = torch.randn(1, 5, 64)
    doubled = torch.cat([x, x[:, 1:2]], dim=1)
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [1.0]]])
    with torch.no_grad():
        expected = model._pool(doubled)
        torch.testing.assert_close(masked_attn_pool(model.attn_pool, x, size.log().transpose(1, 2).unsqueeze(1)),
                                   model.attn_pool(doubled), atol=1e-5, rtol=0)
        vitprune.patch(model, "tome", r=0)
        model._vitprune.final_size = size
        ours = model._pool(x)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=0)


def test_unsupported_towers_say_why():
    custom = tower(qk_norm=True)
    with pytest.raises(ValueError, match="CustomResidualAttentionBlock"):
        vitprune.patch(custom, "tome", r=2)
    assert not vitprune.is_patched(custom)
    trunk = _build_vision_tower(32, CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", image_size=32))
    with pytest.raises(ValueError, match=r"visual\.trunk"):
        vitprune.patch(trunk, "tome", r=2)
    resnet = _build_vision_tower(32, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64))
    with pytest.raises(ValueError, match="no tokens"):
        vitprune.patch(resnet, "tome", r=2)


def test_bad_inputs_are_clear_errors():
    model = vitprune.patch(tower(patch_dropout=0.5), "tome", r=2)
    for x, match in [(torch.randn(3, 96, 96), r"\[B, C, H, W\]"), (images(1, 64), "does not match the model's 96x96"),
                     (torch.randn(1, 1, 96, 96), "channel")]:
        with pytest.raises(ValueError, match=match):
            model(x)
    with torch.no_grad():
        assert model(images(1, 96)).shape == (1, 32)  # eval: patch dropout is off
    model.train()
    with pytest.raises(ValueError, match="patch dropout is active"):
        model(images(1, 96))


# ---- learned selectors train ------------------------------------------------------------------------------------

def test_spvit_selectors_train_then_run_fixed_counts():
    """A few optimizer steps on random images move the selectors (distilling the unpatched tower's embedding);
    then eval runs the fixed token counts, batch = image by image."""
    from vitprune.train.losses import ratio_loss

    model = tower(layers=6)
    x = images(8, 96)
    with torch.no_grad():
        teacher = model(x)
    keep = (0.7, 0.4)
    vitprune.patch(model, "spvit", keep=keep, blocks=(2, 4))
    model.requires_grad_(False)
    selectors = model.vitprune_method
    selectors.requires_grad_(True)
    before = {k: v.clone() for k, v in selectors.state_dict().items()}
    opt = torch.optim.AdamW(selectors.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        student = model(x)
        keeps = list(vitprune.last_trace(model).notes["selector_keep"].values())
        loss = torch.nn.functional.mse_loss(student, teacher) + ratio_loss(keeps, keep)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in selectors.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[1:]) < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in selectors.state_dict().items())
    model.eval()
    with torch.no_grad():
        batch = model(x[:3])
        trace = vitprune.last_trace(model)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert trace.tokens_mlp == [37, 37, 1 + 25 + 1, 27, 1 + 14 + 2, 17]  # CLS + round(ρ·36) kept + packages
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)


# ---- ONNX ------------------------------------------------------------------------------------------------------

def test_onnx_export_of_fixed_count_tome_matches_pytorch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitprune.hw.onnx_export import OrtModule, export_onnx, max_abs_diff, ort_session

    model = vitprune.patch(tower(), "tome", r=4)
    x = images(2, 96)
    path = export_onnx(model, tmp_path / "m.onnx", sample=x)
    runtime = OrtModule(ort_session(path, threads=1))
    assert max_abs_diff(model, runtime, x) < 1e-4
    assert max_abs_diff(model, runtime, images(5, 96)) < 1e-4  # the batch axis is dynamic


# ---- building by name, the registry without open_clip ---------------------------------------------------------

def test_create_model_by_name_is_a_patchable_tower():
    from vitprune.bench import _depth, _token_count
    from vitprune.models import create_model

    model = create_model("open_clip:ViT-S-32")
    assert type(model) is VisionTransformer and not model.training
    assert _token_count(model) == 50 and _depth(model) == 12 and model.pretrained_cfg["input_size"] == (3, 224, 224)
    keys = set(model.state_dict())
    assert not any(k.startswith(("blocks.", "patch_embed.")) for k in keys)  # nothing registered twice
    vitprune.patch(model, "tome", r=4)
    with torch.no_grad():
        assert model(images(1)).shape == (1, 384)
    with pytest.raises(ValueError, match="no model 'ViT-X-99'"):
        create_model("open_clip:ViT-X-99")
    with pytest.raises(ValueError, match="without weights"):
        create_model("open_clip:ViT-S-32", pretrained=True)


def test_registry_works_without_open_clip():
    """open_clip not installed (blocked import): timm models still patch, and open_clip:<name> says what to install."""
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "import timm, torch, vitprune\n"
            "m = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8).eval()\n"
            "vitprune.patch(m, 'tome', r=2); m(torch.randn(1, 3, 32, 32))\n"
            "assert 'open_clip' not in vitprune.available_backends()\n"
            "from vitprune.models import create_model\n"
            "try:\n    create_model('open_clip:ViT-B-32')\nexcept ImportError as e:\n"
            "    assert \"vitprune[open_clip]\" in str(e), e\nelse:\n    raise AssertionError('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180)
