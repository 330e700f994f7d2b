"""CLIP and SigLIP vision towers (alone, with a projection, in CLIPModel/SiglipModel, under a classifier) and Dinov2
with registers in the HF backend: identity when off, exact unpatch, the same numbers as timm with the same weights,
every method, SigLIP's pooling head under reduction, MACs, a selector trained on a tower, ONNX export."""
from __future__ import annotations

import copy
import pickle
from functools import partial

import pytest
import torch

transformers = pytest.importorskip("transformers")

import timm  # noqa: E402
import vitprune  # noqa: E402
from transformers import (CLIPConfig, CLIPForImageClassification, CLIPModel, CLIPTextModel,  # noqa: E402
                          CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2WithRegistersBackbone,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification,
                          Dinov2WithRegistersModel, SiglipConfig, SiglipForImageClassification, SiglipModel,
                          SiglipTextModel, SiglipVisionConfig, SiglipVisionModel)
from vitprune.attention import size_bias  # noqa: E402
from vitprune.backends.hf import HFVisionModel, siglip_head, size_weighted_patch_mean  # noqa: E402
from vitprune.backends.timm import pool_reduced  # noqa: E402
from vitprune.measure.flops import count_macs, paper_vit_macs  # noqa: E402
from conftest import hf_outputs_off_and_reduced  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 layers, 4x4 patches of 8 px (+ CLS for CLIP); mlp_ratio 4, as the timm models below
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=8)
REGISTERS = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8, mlp_ratio=2,
                 num_register_tokens=2, layerscale_value=0.5)
BUILD = {
    "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)),
    "CLIPVisionModelWithProjection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION,
                                                                                            projection_dim=24)),
    "SiglipVisionModel": lambda: SiglipVisionModel(SiglipVisionConfig(**VISION)),
    "Dinov2WithRegistersModel": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**REGISTERS)),
    "Dinov2WithRegistersForImageClassification": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**REGISTERS, num_labels=5)),
    "CLIPModel": lambda: CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)),
    "SiglipModel": lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config={**TEXT, "projection_size": 64})),
    "CLIPForImageClassification": lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION, text_config=TEXT,
                                                                                 num_labels=5)),
    "SiglipForImageClassification": lambda: SiglipForImageClassification(SiglipConfig(vision_config=VISION,
                                                                                      text_config=TEXT, num_labels=5)),
}
OFF = [("tome", {"r": 0}), ("evit", {"keep": 1.0, "blocks": (1, 2)})]
# patch tokens after each block's reduction (4x4 grid, 3 blocks); the prefix (CLS) comes on top
METHODS = {
    "tome": ({"r": 3}, [13, 10, 7]),
    "evit": ({"keep": 0.5, "blocks": (1,)}, [16, 9, 9]),  # 8 kept + the fused token
    "ppt": ({"r": 3, "blocks": (1, 2)}, [16, 13, 10]),
    "togo": ({"keep": 0.5, "blocks": (1,)}, [16, 8, 8]),
    "spvit": ({"keep": (0.7, 0.4), "blocks": (1, 2)}, [16, 12, 8]),  # 11 + 1 package, 6 + 2 packages
    "heatvit": ({"keep": (0.7, 0.4), "blocks": (1, 2)}, [16, 12, 7]),  # one package, updated
}


def make(name: str):
    return BUILD[name]().eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the model gives for images (CLIPModel/SiglipModel: ``get_image_features``)."""
    if isinstance(model, (CLIPModel, SiglipModel)):
        out = model.get_image_features(pixel_values=x)
    else:
        out = model(pixel_values=x)
    keys = ("logits", "image_embeds", "last_hidden_state", "pooler_output")
    return {k: getattr(out, k) for k in keys if getattr(out, k, None) is not None}


def pooled(model, x: torch.Tensor) -> torch.Tensor:
    """The image feature: the tower's pooled output (CLIP: post_layernorm(CLS); SigLIP: its attention head)."""
    return model(pixel_values=x).pooler_output


def perturbed(model):
    """No near-constant parameters (LayerNorm at 1/0, zero biases), so every token and every weight differs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---- identity when off; unpatch restores exactly ------------------------------------------------------------

@pytest.mark.smoke
@pytest.mark.parametrize("name", list(BUILD))
def test_reduction_off_equals_unpatched_and_unpatch_is_exact(name: str) -> None:
    model = make(name)
    classes = {n: type(m) for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    x = images()
    with torch.no_grad():
        ref = outputs(model, x)
        for method, cfg in OFF:
            vitprune.patch(model, method, **cfg)
            out = outputs(model, x)
            assert set(out) == set(ref)
            for k, v in out.items():
                torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0, msg=f"{name} {method} {k}")
        vitprune.patch(model, "tome", r=3)
        outputs(model, x)
        vitprune.unpatch(model)
        after = outputs(model, x)
    assert not vitprune.is_patched(model) and type(model).__name__ == name
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(after[k], v) for k, v in ref.items())


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_image_text_model_reduces_only_the_vision_tower(name: str) -> None:
    model = make(name)
    x, ids = images(), torch.randint(0, TEXT["vocab_size"], (3, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=x)
        vitprune.patch(model, "tome", r=3)
        out = model(input_ids=ids, pixel_values=x)
        features = model.get_image_features(pixel_values=x).pooler_output
    assert type(model.text_model) in (CLIPTextModel, SiglipTextModel)  # not swapped
    assert torch.equal(out.text_embeds, ref.text_embeds)  # the text tower is untouched
    prefix = int(name == "CLIPModel")
    assert vitprune.last_trace(model).tokens_mlp == [prefix + n for n in METHODS["tome"][1]]
    torch.testing.assert_close(out.image_embeds, features / features.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    assert (out.image_embeds - ref.image_embeds).abs().max() > 1e-4  # the reduced tower gave them
    assert out.logits_per_image.shape == (2, 3)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel", "SiglipForImageClassification"])
def test_patched_models_pickle_and_deepcopy(name: str) -> None:
    model = vitprune.patch(make(name), "evit", keep=0.5, blocks=(1,))
    classes = {n: type(m) for n, m in model.named_modules()}
    x = images()
    with torch.no_grad():
        ref = outputs(model, x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert vitprune.is_patched(other) and {n: type(m) for n, m in other.named_modules()} == classes
            out = outputs(other, x)
            assert all(torch.equal(out[k], v) for k, v in ref.items())
            vitprune.unpatch(other)
            assert not any(type(m).__name__.startswith("VitPrune") for m in other.modules())


# ---- every method, batch = image by image ------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name,prefix", [("CLIPVisionModel", 1), ("SiglipVisionModel", 0),
                                         ("Dinov2WithRegistersModel", 3)])
def test_every_method_batch_equals_image_by_image(name: str, prefix: int, method: str) -> None:
    cfg, patches = METHODS[method]
    model = vitprune.patch(make(name), method, **cfg)
    x = images(3)
    with torch.no_grad():
        batch = outputs(model, x)
        trace = vitprune.last_trace(model)
        single = [outputs(model, x[i:i + 1]) for i in range(3)]
    info = model._vitprune.info
    assert info.num_prefix == prefix and info.has_cls == (prefix > 0)  # SigLIP: no CLS, received attention ranks
    assert trace.tokens_mlp == [prefix + n for n in patches]
    for k, v in batch.items():
        torch.testing.assert_close(v, torch.cat([s[k] for s in single]), atol=1e-4, rtol=0, msg=f"{method} {k}")


@pytest.mark.parametrize("name,prefix", [("Dinov2WithRegistersForImageClassification", 3),
                                         ("CLIPForImageClassification", 1), ("SiglipForImageClassification", 0)])
def test_classifier_means_are_size_weighted_and_leave_out_the_prefix(name: str, prefix: int) -> None:
    """Dinov2 with registers: CLS ‖ mean of the patches (registers left out); CLIP: mean after CLS; SigLIP: mean."""
    model = vitprune.patch(make(name), "tome", r=3)
    encoder = model.dinov2_with_registers if prefix == 3 else model.vision_model
    x = images()
    with torch.no_grad():
        out = model(x, labels=torch.tensor([1, 4]))
        seq = encoder(x).last_hidden_state  # the same images: the same reduction
    ctx = model._vitprune
    assert ctx.info.num_prefix == prefix and vitprune.last_trace(model).tokens_mlp == [prefix + n for n in (13, 10, 7)]
    assert ctx.final_size[:, :prefix].eq(1).all() and ctx.final_size.sum(dim=1).eq(prefix + 16).all()
    features = size_weighted_patch_mean(seq, ctx.final_size, prefix)
    plain = seq[:, prefix:].mean(dim=1)
    if prefix == 3:
        features, plain = torch.cat([seq[:, 0], features], dim=1), torch.cat([seq[:, 0], plain], dim=1)
    torch.testing.assert_close(out.logits, model.classifier(features), atol=1e-5, rtol=0)
    assert (out.logits - model.classifier(plain)).abs().max() > 1e-4  # merged tokens do weigh more
    assert out.loss is not None and torch.isfinite(out.loss)


# ---- SigLIP's attention-pooling head under reduction ---------------------------------------------------------

def test_siglip_head_weighs_a_merged_token_like_its_copies_and_ignores_masked_ones() -> None:
    model = vitprune.patch(make("SiglipVisionModel"), "tome", r=0)
    ctx, pool = model._vitprune, partial(siglip_head, model.head)
    x = torch.randn(1, 5, VISION["hidden_size"])
    with torch.no_grad():
        ctx.final_size, ctx.final_keep = torch.tensor([[[2.0], [1.0], [1.0], [1.0], [1.0]]]), None
        twice = model.head(torch.cat([x, x[:, :1]], dim=1))  # token 0 twice, unmerged, through HF's own head
        torch.testing.assert_close(pool_reduced(x, "map", ctx, pool, 0), twice, atol=1e-5, rtol=0)
        ctx.final_size, ctx.final_keep = None, torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])  # token 2 masked out
        without = model.head(x[:, [0, 1, 3, 4]])
        torch.testing.assert_close(pool_reduced(x, "map", ctx, pool, 0), without, atol=1e-5, rtol=0)


def test_siglip_forward_pools_with_the_size_bias() -> None:
    model = vitprune.patch(make("SiglipVisionModel"), "tome", r=4)
    with torch.no_grad():
        out = model(images())
        size = model._vitprune.final_size
        biased = siglip_head(model.head, out.last_hidden_state, size_bias(size, out.last_hidden_state.dtype))
        plain = model.head(out.last_hidden_state)
    assert size.shape[1] == 16 - 12 and size.sum(dim=1).eq(16).all()
    torch.testing.assert_close(out.pooler_output, biased, atol=1e-6, rtol=0)
    assert (out.pooler_output - plain).abs().max() > 1e-4  # merged tokens do weigh more


def test_siglip_without_head_pools_as_hf_does() -> None:
    hf = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=False)).eval()
    net = HFVisionModel(hf).eval()
    x = images()
    with torch.no_grad():
        assert hf(x).pooler_output is None
        ref = net(x)
        torch.testing.assert_close(ref, hf(x).last_hidden_state.mean(dim=1), atol=0, rtol=0)
        vitprune.patch(net, "tome", r=4)
        out, seq = net(x), hf(x).last_hidden_state
        assert hf(x).pooler_output is None
    torch.testing.assert_close(out, size_weighted_patch_mean(seq, net._vitprune.final_size, 0), atol=1e-6, rtol=0)


# ---- the same weights in timm: the same numbers --------------------------------------------------------------

def timm_clip(act: str):
    return timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=64, patch_size=8, embed_dim=64,
                             depth=3, num_heads=2, num_classes=0, act_layer=act).eval()


def timm_siglip():
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=64, patch_size=8,
                             embed_dim=64, depth=3, num_heads=2, num_classes=0).eval()


def layers_to_timm(hf_state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """CLIP/SigLIP encoder layers → timm blocks: fused qkv = cat(q, k, v), renamed norms and projections."""
    out = {}
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            for old, new in names.items():
                out[f"{dst}{new}.{p}"] = hf_state[f"{src}{old}.{p}"]
            out[f"{dst}attn.qkv.{p}"] = torch.cat([hf_state[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"])
    return out


def clip_to_timm(hf: CLIPVisionModel) -> dict[str, torch.Tensor]:
    s = hf.state_dict()
    out = layers_to_timm(s, hf.config.num_hidden_layers)
    out.update({
        "cls_token": s["embeddings.class_embedding"].view(1, 1, -1),
        "pos_embed": s["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": s["embeddings.patch_embedding.weight"],
        "norm_pre.weight": s["pre_layrnorm.weight"], "norm_pre.bias": s["pre_layrnorm.bias"],
        "norm.weight": s["post_layernorm.weight"], "norm.bias": s["post_layernorm.bias"],
    })
    return out


def siglip_to_timm(hf: SiglipVisionModel) -> dict[str, torch.Tensor]:
    """Including the MAP head: probe → latent, MultiheadAttention's in_proj = [q; k; v] → q and fused kv."""
    s, c = hf.state_dict(), hf.config.hidden_size
    out = layers_to_timm(s, hf.config.num_hidden_layers)
    out.update({
        "pos_embed": s["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": s["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": s["embeddings.patch_embedding.bias"],
        "norm.weight": s["post_layernorm.weight"], "norm.bias": s["post_layernorm.bias"],
        "attn_pool.latent": s["head.probe"],
        "attn_pool.q.weight": s["head.attention.in_proj_weight"][:c],
        "attn_pool.q.bias": s["head.attention.in_proj_bias"][:c],
        "attn_pool.kv.weight": s["head.attention.in_proj_weight"][c:],
        "attn_pool.kv.bias": s["head.attention.in_proj_bias"][c:],
    })
    for old, new in {"head.attention.out_proj": "attn_pool.proj", "head.layernorm": "attn_pool.norm",
                     "head.mlp.fc1": "attn_pool.mlp.fc1", "head.mlp.fc2": "attn_pool.mlp.fc2"}.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = s[f"{old}.{p}"]
    return out


def same_weights(family: str, act: str = "gelu"):
    """(timm model, HF tower) holding the same (perturbed random) weights; 8x8 patches + CLS for CLIP."""
    vision = {**VISION, "image_size": 64, "hidden_act": act}
    if family == "clip":
        timm_model = timm_clip(act)
        hf = perturbed(CLIPVisionModel(CLIPVisionConfig(**vision, layer_norm_eps=timm_model.norm.eps)))
        state = clip_to_timm(hf)
    else:
        timm_model = timm_siglip()
        hf = perturbed(SiglipVisionModel(SiglipVisionConfig(**vision, layer_norm_eps=timm_model.norm.eps)))
        state = siglip_to_timm(hf)
    timm_model.load_state_dict(state, strict=True)
    return timm_model, hf


@pytest.mark.parametrize("family,act", [("clip", "quick_gelu"), ("clip", "gelu"), ("siglip", "gelu")])
def test_timm_and_hf_towers_give_the_same_numbers(family: str, act: str) -> None:
    """Same weights in both libraries: the same features unpatched, and under ToMe and EViT (one engine)."""
    timm_model, hf = same_weights(family, act)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pooled(hf, x), timm_model(x), atol=1e-5, rtol=0)
        for method, cfg in [("tome", {"r": 8}), ("evit", {"keep": 0.7, "blocks": (1, 2)})]:
            vitprune.patch(timm_model, method, **cfg)
            vitprune.patch(hf, method, **cfg)
            torch.testing.assert_close(pooled(hf, x), timm_model(x), atol=1e-4, rtol=0, msg=method)
            tokens = vitprune.last_trace(timm_model).tokens_mlp
            assert vitprune.last_trace(hf).tokens_mlp == tokens and tokens[-1] < tokens[0], method
        if family == "siglip":  # every token's features, not just the pooled one
            torch.testing.assert_close(hf(x).last_hidden_state, timm_model.forward_features(x), atol=1e-4, rtol=0)


# ---- HF's options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_output_hidden_states_and_attentions(name: str) -> None:
    model = BUILD[name]()
    model = type(model)._from_config(model.config, attn_implementation="eager").eval()  # HF returns attentions
    x = images()
    out, trace = hf_outputs_off_and_reduced(model, x)
    with torch.no_grad():
        as_tuple = model(x, return_dict=False)
    assert [h.shape[1] for h in out.hidden_states] == [trace.tokens_attn[0]] + trace.tokens_mlp
    assert [a.shape for a in out.attentions] == [(2, 2, n, n) for n in trace.tokens_attn]
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


def test_interpolate_pos_encoding_and_bad_input() -> None:
    model = make("CLIPVisionModel")
    x = images(1, 48)
    with torch.no_grad():
        ref = model(x, interpolate_pos_encoding=True).pooler_output
        vitprune.patch(model, "tome", r=0)
        out = model(x, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert vitprune.last_trace(model).tokens_attn[0] == 1 + 36
    for bad, match in [(x, "interpolate_pos_encoding=True"), (torch.randn(1, 1, 32, 32), "channel")]:
        with pytest.raises(ValueError, match=match):
            model(bad)
    with pytest.raises(ValueError, match="does not take"):
        model(images(1), head_mask=torch.ones(2))


# ---- MACs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "SiglipVisionModel"])
def test_macs_match_the_formula(name: str) -> None:
    """Executed-op MACs = the papers' formula + patch embedding + head (CLIP: projection; SigLIP: its MAP head)."""
    model = make(name)
    info = vitprune.patch(model, "tome", r=0)._vitprune.info
    n, c = info.num_tokens, info.dim
    expect = paper_vit_macs([n] * 3, [n] * 3, c, info.patch_embed_macs, info.head_macs, info.mlp_ratio)
    assert info.patch_embed_macs == 16 * 3 * 8 * 8 * c
    assert info.head_macs == (24 * c if name.startswith("CLIP") else 2 * c * c + 2 * n * c * c + 2 * n * c + 2 * c * 256)
    assert count_macs(model, images(1)).macs == pytest.approx(expect, rel=1e-6)
    vitprune.unpatch(model)
    assert count_macs(model, images(1)).macs == pytest.approx(expect, rel=1e-6)


# ---- a selector trained on a tower ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_spvit_trains_on_a_tower_then_runs_fixed_counts(name: str) -> None:
    """A few real steps (distil the unpatched tower's features + the ratio loss), then fixed-count inference."""
    from vitprune.train.losses import ratio_loss

    teacher = make(name)
    model = vitprune.patch(copy.deepcopy(teacher), "spvit", keep=(0.7, 0.4), blocks=(1, 2))
    method = model._vitprune.method
    selectors = model.vitprune_method
    before = [p.detach().clone() for p in selectors.parameters()]
    optimizer = torch.optim.Adam(selectors.parameters(), lr=1e-2)  # no decay: a change means a gradient
    model.train()
    for _ in range(3):
        x = images(4)
        with torch.no_grad():
            target = pooled(teacher, x)
        out = pooled(model, x)
        keeps = vitprune.last_trace(model).notes["selector_keep"]
        loss = (out - target).pow(2).mean() + ratio_loss(list(keeps.values()), list(method.target_keep().values()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, selectors.parameters()))
    assert vitprune.last_trace(model).tokens_attn[1] > 16  # training masked tokens: every position stayed
    model.eval()
    x = images(3)
    with torch.no_grad():
        batch = pooled(model, x)
        single = torch.cat([pooled(model, x[i:i + 1]) for i in range(3)])
    prefix = int(name == "CLIPVisionModel")
    assert vitprune.last_trace(model).tokens_mlp == [prefix + n for n in METHODS["spvit"][1]]
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)


# ---- ONNX ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg", [("tome", {"r": 3}), ("evit", {"keep": 0.5, "blocks": (1, 2)})])
def test_onnx_export_of_a_clip_tower_matches_pytorch(tmp_path, method: str, cfg: dict) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitprune.hw.onnx_export import OrtModule, export_onnx, max_abs_diff, ort_session

    net = vitprune.patch(HFVisionModel(make("CLIPVisionModel")).eval(), method, **cfg)
    x = images(2)
    runtime = OrtModule(ort_session(export_onnx(net, tmp_path / "m.onnx", sample=x), threads=1))
    assert max_abs_diff(net, runtime, x) < 1e-4
    assert max_abs_diff(net, runtime, images(3)) < 1e-4  # the batch axis is dynamic


# ---- building by name; what is not supported ---------------------------------------------------------------

def test_create_model_builds_towers_by_class_name(tmp_path) -> None:
    from vitprune.models import create_model

    x = images()
    for spec, kwargs, width in [("CLIPVisionModel", VISION, 64), ("SiglipVisionModel", VISION, 64),
                                ("CLIPVisionModelWithProjection", {**VISION, "projection_dim": 24}, 24),
                                ("Dinov2WithRegistersModel", REGISTERS, 64),
                                ("CLIPModel", dict(vision_config=VISION, text_config=TEXT, projection_dim=24), 24),
                                ("CLIPForImageClassification", dict(vision_config=VISION, text_config=TEXT,
                                                                    num_labels=5), 5),
                                ("SiglipModel", dict(vision_config=VISION, text_config=TEXT), 64)]:  # image side only
        net = create_model(f"hf:{spec}", **kwargs)
        assert type(net.hf).__name__ == spec and net.patch_embed.num_patches == 16 and len(net.blocks) == 3
        with torch.no_grad():
            ref = net(x)
            assert ref.shape == (2, width), spec
            vitprune.patch(net, "tome", r=0)
            torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=0, msg=spec)
    assert net.num_prefix_tokens == 0 and net.pretrained_cfg["mean"] == (0.5,) * 3
    net.hf.save_pretrained(tmp_path / "siglip")  # a saved CLIP/SigLIP folder loads as its own class
    assert type(create_model(f"hf:{tmp_path / 'siglip'}").hf) is SiglipModel


@pytest.mark.parametrize("cls,config", [
    (CLIPTextModel, CLIPConfig(text_config=TEXT).text_config),
    (SiglipTextModel, SiglipConfig(text_config=TEXT).text_config),
    (Dinov2WithRegistersBackbone, Dinov2WithRegistersConfig(**REGISTERS)),
], ids=lambda v: getattr(v, "__name__", ""))
def test_unsupported_classes_say_what_is_supported(cls, config) -> None:
    model = cls(config).eval()
    with pytest.raises(ValueError, match=f"cannot patch {cls.__name__}: supported .*CLIPVisionModel.*SiglipModel"):
        vitprune.patch(model, "tome", r=2)
    assert not vitprune.is_patched(model) and type(model) is cls


def test_patching_a_part_twice_is_refused() -> None:
    model = vitprune.patch(make("CLIPModel"), "tome", r=2)
    with pytest.raises(ValueError, match="already patched"):
        vitprune.patch(model.vision_model, "tome", r=2)
    vitprune.unpatch(model)
    vitprune.patch(model.vision_model, "tome", r=2)  # the tower on its own: get_image_features uses it
    with pytest.raises(ValueError, match="patched on its own"):
        vitprune.patch(model, "tome", r=2)
    assert not vitprune.is_patched(model)
