"""The Hugging Face transformers backend: identity when off, one engine with timm, exact unpatch, HF's options."""
from __future__ import annotations

import copy
import json
from dataclasses import replace
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitprune  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,  # noqa: E402
                          DeiTModel, Dinov2Config, Dinov2ForImageClassification, Dinov2Model, ViTConfig,
                          ViTForImageClassification, ViTForMaskedImageModeling, ViTModel)
from vitprune.backends.hf import HFVisionModel, size_weighted_patch_mean  # noqa: E402
from vitprune.backends.hf_convert import hf_from_timm  # noqa: E402
from vitprune.methods.base import TokenReducer  # noqa: E402
from vitprune.tokens import TokenState  # noqa: E402
from conftest import hf_outputs_off_and_reduced  # noqa: E402

TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=32, patch_size=4)
CONFIGS = {
    ViTModel: ViTConfig(**TINY, intermediate_size=96),
    ViTForImageClassification: ViTConfig(**TINY, intermediate_size=96, num_labels=7),
    DeiTModel: DeiTConfig(**TINY, intermediate_size=96),
    DeiTForImageClassification: DeiTConfig(**TINY, intermediate_size=96, num_labels=7),
    DeiTForImageClassificationWithTeacher: DeiTConfig(**TINY, intermediate_size=96, num_labels=7),
    Dinov2Model: Dinov2Config(**TINY, mlp_ratio=2, layerscale_value=0.5),
    Dinov2ForImageClassification: Dinov2Config(**TINY, mlp_ratio=2, layerscale_value=0.5, num_labels=7),
}
OFF = [("tome", {"r": 0}), ("evit", {"keep": 1.0, "blocks": (1, 2)})]
METHODS = [("tome", {"r": 6}), ("evit", {"keep": 0.6, "blocks": (1, 2)}), ("ppt", {"r": 8, "blocks": (1, 2)}),
           ("togo", {"keep": 0.5, "blocks": (1, 2)})]


def make_hf(cls, attn_implementation: str | None = None, **overrides):
    config = copy.deepcopy(CONFIGS[cls])
    for k, v in overrides.items():
        setattr(config, k, v)
    if attn_implementation is not None:
        return cls._from_config(config, attn_implementation=attn_implementation).eval()
    return cls(config).eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def all_outputs(out) -> dict[str, torch.Tensor]:
    keys = ("logits", "cls_logits", "distillation_logits", "last_hidden_state", "pooler_output")
    return {k: getattr(out, k) for k in keys if getattr(out, k, None) is not None}


def perturbed(model):
    """Random init with no near-constant parameters (timm starts CLS at ~0), so every token differs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TIMM = {
    "vit": lambda: VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7),
    "deit": lambda: VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                               num_classes=7),
    "dinov2": lambda: VisionTransformer(img_size=28, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=0,
                                        init_values=0.5),
}


# ---- the same model, the same numbers -----------------------------------------------------------------------

@pytest.mark.smoke
@pytest.mark.parametrize("cls", list(CONFIGS), ids=lambda c: c.__name__)
def test_reduction_off_equals_unpatched(cls):
    model = make_hf(cls)
    x = images()
    with torch.no_grad():
        unpatched = model(x)
        ref = all_outputs(unpatched)
        for method, cfg in OFF:
            vitprune.patch(model, method, **cfg)
            out = model(x)
            assert type(out) is type(unpatched)  # HF's own output types
            for k, v in all_outputs(out).items():
                assert (v - ref[k]).abs().max().item() < 1e-5, (cls.__name__, method, k)
            vitprune.unpatch(model)
    assert set(ref) == set(all_outputs(model(x)))


def test_dinov2_swiglu_and_macs():
    from vitprune.measure.flops import count_macs

    model = make_hf(Dinov2Model, use_swiglu_ffn=True)
    x = images(1)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        vitprune.patch(model, "tome", r=0)
        assert (model(x).last_hidden_state - ref).abs().max().item() < 1e-5
    info = model._vitprune.info
    n, c = info.num_tokens, info.dim
    block = 4 * n * c * c + 2 * n * n * c + 2 * info.mlp_ratio * n * c * c  # DESIGN.md §3, per block
    assert count_macs(model, x).macs == pytest.approx(info.depth * block + info.patch_embed_macs, rel=1e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("family", list(TIMM))
def test_timm_and_hf_share_one_engine(family):
    """Same weights, same method → same outputs and token counts: the two backends run one engine."""
    timm_model = perturbed(TIMM[family]())
    hf = hf_from_timm(timm_model)
    x = torch.randn(2, 3, *timm_model.patch_embed.img_size)
    with torch.no_grad():
        pooled = hf(x).pooler_output if family == "dinov2" else main_output(hf(x))
        assert (timm_model(x) - pooled).abs().max().item() < 1e-5
        for method, cfg in METHODS:
            vitprune.patch(timm_model, method, **cfg)
            vitprune.patch(hf, method, **cfg)
            ref, out = timm_model(x), hf(x)
            out = out.pooler_output if family == "dinov2" else out.logits
            assert (ref - out).abs().max().item() < 1e-4, (family, method)
            t_trace, h_trace = vitprune.last_trace(timm_model), vitprune.last_trace(hf)
            assert t_trace.tokens_mlp == h_trace.tokens_mlp, (family, method)
            assert t_trace.tokens_mlp[-1] < t_trace.tokens_attn[0], (family, method)  # it did reduce
        if family == "dinov2":  # features of every token, not just CLS
            assert (timm_model.forward_features(x) - hf(x).last_hidden_state).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,cfg", [("spvit", {"keep": (0.7, 0.4), "blocks": (1, 2)}),
                                      ("heatvit", {"keep": (0.7, 0.5), "blocks": (1, 2), "mode": "adaptive", "threshold": 0.6})])
def test_learned_selectors_match_timm(name, cfg):
    """One selector object (same weights) on both backends: eval (gathered) and train (Gumbel, masked) alike."""
    timm_model = perturbed(TIMM["vit"]())
    hf = hf_from_timm(timm_model)
    method = vitprune.create_method(name, **cfg)
    vitprune.patch(timm_model, method)
    vitprune.patch(hf, method)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = timm_model(x), hf(x).logits
    assert (ref - out).abs().max().item() < 1e-4
    assert vitprune.last_trace(timm_model).tokens_mlp == vitprune.last_trace(hf).tokens_mlp
    assert vitprune.last_trace(hf).tokens_mlp[-1] < 65
    timm_model.train(), hf.train()
    torch.manual_seed(1)
    ref = timm_model(x)
    torch.manual_seed(1)
    out = hf(x).logits
    assert (ref - out).abs().max().item() < 1e-4
    out.sum().backward()
    assert method.module[str(cfg["blocks"][0])].out_conv[-1].weight.grad.abs().sum() > 0


class MaskEveryOther(TokenReducer):
    """A stand-in for a learned selector while it trains: masks every other patch before block 1 (static shapes)."""

    def __init__(self, soft: bool) -> None:
        self.soft = soft

    def before_attention(self, layer: int, state: TokenState, trace) -> TokenState:
        if layer != 1:
            return state
        keep = torch.ones(state.x.shape[:2])
        keep[:, state.num_prefix::2] = 0.0
        return replace(state, keep=keep.requires_grad_(self.soft))  # soft: the explicit masked-softmax path


@pytest.mark.parametrize("soft", [False, True])
def test_masked_attention_path_matches_timm(soft):
    timm_model = perturbed(TIMM["vit"]())
    hf = hf_from_timm(timm_model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = timm_model(x)
        vitprune.patch(timm_model, MaskEveryOther(soft))
        vitprune.patch(hf, MaskEveryOther(soft))
        out, masked = hf(x, output_attentions=True).logits, timm_model(x)
        attn = hf(x, output_attentions=True).attentions
    assert (out - masked).abs().max().item() < 1e-4 and (masked - ref).abs().max().item() > 1e-4
    others = 1.0 - torch.eye(attn[1].shape[-1])  # (the soft path lets a masked token still see itself)
    assert (attn[1] * others)[:, :, :, 1::2].abs().max().item() < 1e-5  # nobody attends to a masked token
    assert attn[0][:, :, :, 1::2].abs().max().item() > 1e-3


@pytest.mark.parametrize("cls", [ViTForImageClassification, Dinov2ForImageClassification, DeiTModel],
                         ids=lambda c: c.__name__)
def test_unpatch_restores_exactly(cls):
    model = make_hf(cls)
    classes = {n: type(m) for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    sd = copy.deepcopy(model.state_dict())
    x = images()
    with torch.no_grad():
        ref = main_output(model(x))
        vitprune.patch(model, "tome", r=8)
        reduced = main_output(model(x))
        vitprune.patch(model, "togo", keep=0.5, blocks=(1,), head_weights="learned")  # re-patch; a method with parameters
        assert any(k.startswith("vitprune_method") for k in model.state_dict())
        vitprune.unpatch(model)
        out = main_output(model(x))
    assert not vitprune.is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(out, ref)
    if cls is not DeiTModel:  # an encoder's last_hidden_state changes shape; the logits only change value
        assert not torch.allclose(reduced, ref)


def test_dinov2_head_mean_is_size_weighted():
    model = make_hf(Dinov2ForImageClassification)
    vitprune.patch(model, "tome", r=10)
    x = images()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        seq = model.dinov2.layernorm(out.hidden_states[-1])
        size = model._vitprune.final_size
        expected = model.classifier(torch.cat([seq[:, 0], size_weighted_patch_mean(seq, size, 1)], dim=1))
        plain = model.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))
    assert size is not None and size.shape[1] == seq.shape[1] == 65 - 30
    assert (out.logits - expected).abs().max().item() < 1e-5
    assert (out.logits - plain).abs().max().item() > 1e-4  # the merged tokens do weigh more


# ---- HF's options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", [ViTForImageClassification, Dinov2Model], ids=lambda c: c.__name__)
def test_attn_implementation_choices(cls, impl):
    model = make_hf(cls, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    x = images()
    with torch.no_grad():
        ref = main_output(model(x))
        vitprune.patch(model, "tome", r=0)
        assert (main_output(model(x)) - ref).abs().max().item() < 1e-5
        vitprune.patch(model, "tome", r=6)
        reduced = main_output(model(x))
    other = make_hf(cls, attn_implementation="sdpa" if impl == "eager" else "eager")
    other.load_state_dict(model.state_dict())
    vitprune.patch(other, "tome", r=6)
    with torch.no_grad():  # the patched model always runs vitprune's attention (SDPA + size bias)
        assert (main_output(other(x)) - reduced).abs().max().item() < 1e-5


@pytest.mark.parametrize("cls", [ViTForImageClassification, DeiTForImageClassificationWithTeacher, Dinov2Model],
                         ids=lambda c: c.__name__)
def test_interpolate_pos_encoding(cls):
    model = make_hf(cls)
    x = images(2, 48)
    kwargs = {} if cls is Dinov2Model else {"interpolate_pos_encoding": True}  # Dinov2 always interpolates
    with torch.no_grad():
        ref = main_output(model(x, **kwargs))
        vitprune.patch(model, "tome", r=0)
        assert (main_output(model(x, **kwargs)) - ref).abs().max().item() < 1e-5
        vitprune.patch(model, "tome", r=4)
        model(x, **kwargs)
    prefix = 2 if cls is DeiTForImageClassificationWithTeacher else 1
    assert vitprune.last_trace(model).tokens_attn[0] == prefix + 12 * 12
    if cls is not Dinov2Model:
        with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
            model(x)


def test_output_hidden_states_and_attentions():
    model = make_hf(ViTForImageClassification, attn_implementation="eager")
    x = images()
    out, trace = hf_outputs_off_and_reduced(model, x)
    with torch.no_grad():
        selected = model(x, output_hidden_states=[0, -1])
        as_tuple = model(x, output_hidden_states=True, return_dict=False)
    # embeddings, then each block's output with the tokens it kept (1 + 32 + fused after block 1)
    assert [h.shape[1] for h in out.hidden_states] == [65] + trace.tokens_mlp == [65, 65, 34, 34]
    assert [a.shape for a in out.attentions] == [(2, 3, n, n) for n in trace.tokens_attn]
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in out.attentions)
    assert selected.hidden_states[1] is None and selected.hidden_states[0] is not None
    assert selected.hidden_states[-1] is not None and selected.attentions is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def test_hardware_path_composes():
    from vitprune.hw import calibrate, dequantize, quantize

    model = make_hf(ViTForImageClassification)
    x = images()
    with torch.no_grad():
        ref = model(x).logits
    quantize(model, calibration=[x])
    with torch.no_grad():
        q = model(x).logits
        vitprune.patch(model, "tome", r=0)
        assert (model(x).logits - q).abs().max().item() < 1e-5
        vitprune.patch(model, "tome", r=6)
        calibrate(model, [x])
        assert torch.isfinite(model(x).logits).all()
    vitprune.unpatch(model)
    dequantize(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_train_mode_gradients_flow():
    model = make_hf(Dinov2ForImageClassification, drop_path_rate=0.1).train()
    vitprune.patch(model, "tome", r=6)
    model(images(), labels=torch.tensor([1, 2])).loss.backward()
    layers = model.dinov2.encoder.layer
    assert layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    assert layers[-1].mlp.fc1.weight.grad.abs().sum() > 0


# ---- bad input: one clear error, model untouched ------------------------------------------------------------

def test_bad_models_and_inputs():
    mim = ViTForMaskedImageModeling(CONFIGS[ViTModel]).eval()
    with pytest.raises(ValueError, match="Masked-image-modeling"):
        vitprune.patch(mim, "tome", r=2)
    assert not vitprune.is_patched(mim) and type(mim.vit) is ViTModel
    with pytest.raises(ValueError, match="unsupported model type.*transformers"):
        vitprune.patch(torch.nn.Linear(3, 3), "tome", r=1)
    model = vitprune.patch(make_hf(ViTForImageClassification), "tome", r=2)
    with pytest.raises(ValueError, match="already patched"):
        vitprune.patch(model.vit, "tome", r=2)
    for x, match in [(images(1, 48), "resize the images to 32x32"), (torch.randn(0, 3, 32, 32), "empty batch"),
                     (torch.randn(1, 1, 32, 32), "channel")]:
        with pytest.raises(ValueError, match=match):
            model(x)
    with pytest.raises(ValueError, match="attention_mask"):
        model(images(1), attention_mask=torch.ones(1, 65))
    with pytest.raises(ValueError, match="does not take"):
        model(images(1), head_mask=torch.ones(3))


def test_timm_path_does_not_import_transformers():
    code = ("import sys, timm, torch, vitprune\n"
            "m = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8).eval()\n"
            "vitprune.patch(m, 'tome', r=2); m(torch.randn(1, 3, 32, 32))\n"
            "assert 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- building models by name: models.create_model("hf:...") and the CLI --------------------------------------

def test_create_model_hf_forms(tmp_path):
    from vitprune.models import create_model

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8, num_labels=5)
    net = create_model("hf:ViTForImageClassification", **small)
    assert isinstance(net, HFVisionModel) and isinstance(net.hf, ViTForImageClassification)
    assert net.patch_embed.num_patches == 16 and net.num_prefix_tokens == 1 and len(net.blocks) == 2
    x = images(2)
    with torch.no_grad():
        ref = net(x)
    assert ref.shape == (2, 5)
    net.hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1] * 3,
                                                                              "image_std": [0.2] * 3}))
    loaded = create_model(f"hf:{tmp_path / 'saved'}")
    assert type(loaded.hf) is ViTForImageClassification and loaded.pretrained_cfg["mean"] == (0.1,) * 3
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    config_only = create_model(f"hf:{tmp_path / 'saved' / 'config.json'}")  # random init from the config
    assert type(config_only.hf) is ViTForImageClassification
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no weights"):
        create_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="neither an existing path"):
        create_model("hf:not_a_model")
    vitprune.patch(net, "tome", r=3)
    with torch.no_grad():
        net(x)
    assert vitprune.last_trace(net).tokens_mlp == [14, 11]
    vitprune.unpatch(net)
    assert type(net.hf.vit) is ViTModel and not hasattr(net, "_vitprune")


def test_cli_bench_hf_config(tmp_path):
    from typer.testing import CliRunner

    from vitprune.cli import app

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5)
    config.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["bench", "--model", f"hf:{tmp_path / 'config.json'}", "-m", "tome:r=3",
                                      "-m", "evit:keep=0.5,blocks=(0,1)", "--no-speed", "--no-accuracy", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "bench.csv").is_file()
    rows = (tmp_path / "out" / "bench.csv").read_text().splitlines()
    assert len(rows) == 4 and "tome" in rows[2] and "evit" in rows[3]


def test_shared_dinov2_weights_in_hf_match_timm(testbed_assets):
    """The shared DINOv2 ViT-S/14 weights converted into HF Dinov2Model give the timm model's features."""
    from vitprune.models import create_model

    timm_model = create_model("dinov2_vits14")
    net = create_model("hf:dinov2_vits14")
    assert type(net.hf) is Dinov2Model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, feats = timm_model.forward_features(x), net.hf(x)
        assert (feats.last_hidden_state - ref).abs().max().item() < 1e-4
        assert (feats.pooler_output - timm_model(x)).abs().max().item() < 1e-4
        vitprune.patch(timm_model, "tome", r=8)
        vitprune.patch(net, "tome", r=8)
        assert (net(x) - timm_model(x)).abs().max().item() < 1e-4
