"""MACs are counted for every attention op torch may run, and a forward with an uncountable matmul-like op raises.

These guard against the 2026-11-30 failure: torch 2.14 sends CPU SDPA to an op its flop counter did not know, and
every MACs figure silently lost the attention matmuls. Each path is checked against its analytical count.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_vit
from vitprune.attention import attend
from vitprune.measure.flops import UncountedOpError, count_macs, paper_vit_macs
from vitprune.measure.op_formulas import attention_backward_flops, attention_flops, is_matmul_like, missing_formulas

pytestmark = pytest.mark.smoke

B, H, N, D = 2, 3, 17, 8
ATTN_MACS = H * N * N * 2 * D  # per image: q·kᵀ and attn·v


class Sdpa(nn.Module):
    """Runs one attention path on x = q, k, v stacked in dim 1: [B, 3, H, N, D]."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.unbind(1)
        if self.path == "no_mask":
            return F.scaled_dot_product_attention(q, k, v)
        if self.path == "float_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(q.shape[0], 1, N, N))
        if self.path == "bool_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(q.shape[0], 1, N, N) > 0.3)
        size = torch.randint(1, 4, (q.shape[0], N, 1)).float()
        if self.path == "size_bias":  # proportional attention: log(size) as a float mask, one SDPA call
            return attend(q, k, v, scale=D**-0.5, size=size)[0]
        if self.path == "masked_softmax":  # selector training: explicit logits, masked softmax, attn @ v
            keep = torch.rand(q.shape[0], N).requires_grad_()
            return attend(q, k, v, scale=D**-0.5, size=size, keep=keep)[0]
        if self.path == "cls_row":  # what EViT/PPT/ToGo read: the output, then one q_cls·Kᵀ row per head
            out, scores = attend(q, k, v, scale=D**-0.5, size=size)
            return out.sum() + scores.cls_attn
        raise AssertionError(self.path)


def _qkv() -> torch.Tensor:
    return torch.randn(B, 3, H, N, D)


@pytest.mark.parametrize("path", ["no_mask", "float_mask", "bool_mask", "size_bias", "masked_softmax"])
def test_each_attention_path_counts_both_matmuls(path: str) -> None:
    count = count_macs(Sdpa(path), _qkv())
    assert count.macs == ATTN_MACS, count.per_op


def test_cls_row_path_counts_one_row_per_head() -> None:
    count = count_macs(Sdpa("cls_row"), _qkv())
    assert count.macs == ATTN_MACS + H * 1 * N * D, count.per_op
    assert count.per_op["bmm"] == H * 1 * N * D


def test_explicit_and_fused_attention_cost_the_same_in_a_timm_vit() -> None:
    model = make_vit("deit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    fused = count_macs(model, x).macs
    for blk in model.blocks:
        blk.attn.fused_attn = False
    assert count_macs(model, x).macs == fused


def test_formulas_for_gqa_and_backward() -> None:
    assert attention_flops((2, 8, 10, 16), (2, 2, 12, 16), (2, 2, 12, 32)) == 2 * 2 * 8 * 10 * 12 * (16 + 32)
    assert attention_backward_flops((1, 1, 4, 8), (1, 1, 5, 8), (1, 1, 5, 8)) == 2 * 4 * 5 * (3 * 8 + 2 * 8)


def test_cpu_flash_op_gets_a_formula_where_torch_lacks_one() -> None:
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        pytest.skip(f"torch {torch.__version__} has no CPU flash attention op")
    assert op in flop_registry or op in missing_formulas()
    assert not set(missing_formulas()) & set(flop_registry)  # torch's own formulas are never replaced


def test_matmul_like_names() -> None:
    for name in ["aten.mm", "aten._int_mm", "aten._scaled_dot_product_flash_attention_for_cpu", "aten.addmm_",
                 "flex_attention", "aten.convolution", "aten.linear", "aten._native_multi_head_attention"]:
        assert is_matmul_like(name), name
    for name in ["aten.upsample_bilinear2d", "aten.softmax", "aten.gelu", "aten.add", "aten.native_layer_norm"]:
        assert not is_matmul_like(name), name


def test_uncountable_attention_op_raises_instead_of_counting_zero() -> None:
    @torch.library.custom_op("vitprune_test::fused_attention", mutates_args=())
    def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    class Custom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused_attention(x, x, x)

    with pytest.raises(UncountedOpError, match="fused_attention.*op_formulas"):
        count_macs(Custom(), torch.randn(1, H, N, D))


# ------------------------------------------------------------ whole models: executed ops == DESIGN §3 formula


def _timm_vit_formula(model: nn.Module) -> int:
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    c = model.embed_dim
    pe = model.patch_embed
    patch = pe.num_patches * c * pe.proj.in_channels * math.prod(pe.patch_size)
    head = c * model.num_classes
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / c
    return paper_vit_macs([n] * len(model.blocks), [n] * len(model.blocks), c, patch, head, mlp_ratio)


@pytest.mark.parametrize(
    "name,kwargs,gmacs",
    [
        ("deit_tiny_patch16_224", {}, 1.26),
        ("deit_small_patch16_224", {}, 4.60),
        ("vit_small_patch14_dinov2", {"img_size": 224, "num_classes": 0}, None),  # the shared DINOv2 config
    ],
)
def test_timm_vits_match_the_formula(name: str, kwargs: dict, gmacs: float | None) -> None:
    model = make_vit(name, **kwargs)
    count = count_macs(model, torch.randn(1, 3, 224, 224))
    assert count.macs == pytest.approx(_timm_vit_formula(model), rel=0.005)
    assert set(count.per_op) >= {"convolution", "addmm"} and sum(count.per_op.values()) == pytest.approx(count.macs)
    if gmacs is not None:
        assert count.gmacs == pytest.approx(gmacs, rel=0.01)


def test_hf_vit_matches_the_formula() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                                 image_size=224, patch_size=16, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    n, c = 197, 192
    expect = paper_vit_macs([n] * 4, [n] * 4, c, 196 * c * 3 * 16 * 16, c * 10)
    assert count_macs(model, torch.randn(1, 3, 224, 224)).macs == pytest.approx(expect, rel=0.005)


def test_pit_s_matches_the_formula() -> None:
    model = make_vit("pit_s_224")
    total = 0.0
    side = model.patch_embed.conv.weight  # [C, 3, P, P]
    grid = 27  # (224 - 16) // 8 + 1
    total += grid * grid * side.shape[0] * side[0].numel()
    for i, stage in enumerate(model.transformers):
        c = stage.blocks[0].attn.qkv.in_features
        if stage.pool is not None:
            grid = (grid + 2 - 3) // 2 + 1
            total += grid * grid * stage.pool.conv.out_channels * 9 + c // 2 * c  # depthwise conv + CLS fc
        n = grid * grid + 1
        total += len(stage.blocks) * (4 * n * c * c + 2 * n * n * c + 8 * n * c * c)
    total += model.head.in_features * model.head.out_features
    count = count_macs(model, torch.randn(1, 3, 224, 224))
    assert count.macs == pytest.approx(total, rel=0.005)
    assert count.gmacs == pytest.approx(2.9, rel=0.05)  # PiT-S in the SPViT table: 2.90 G
