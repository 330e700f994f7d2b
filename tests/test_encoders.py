"""Today's encoders through the timm backend: CLIP towers (``norm_pre``, QuickGELU) run every method; families that
need their own backend (SigLIP's MAP head, EVA/RoPE) are refused with the reason, never run wrongly."""
from __future__ import annotations

import pytest
import timm
import torch

import vitprune
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


@pytest.mark.parametrize("name,reason", [("vit_base_patch16_siglip_224", "global_pool='map'"),
                                         ("eva02_tiny_patch14_224", "unsupported model type")])
def test_encoders_without_a_backend_yet_are_refused(name: str, reason: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    with pytest.raises(ValueError, match=reason):
        vitprune.patch(model, "tome", r=4)
    assert not vitprune.is_patched(model)
