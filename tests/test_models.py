"""Model creation and checkpoint loading: formats, wrappers, and all-or-nothing error handling."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitprune import assets
from vitprune.models import create_model, load_checkpoint


def _assets_or_skip() -> Path:
    try:
        return assets.assets_dir()
    except FileNotFoundError as err:
        pytest.skip(f"shared assets unavailable: {err}")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("steps", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a failed load"


def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() + torch.randn_like(v.float()).to(v.dtype) for k, v in Small().state_dict().items()}


# ---------------------------------------------------------------- loading: formats and wrappers


def test_load_safetensors_roundtrip(tmp_path: Path) -> None:
    state = _trained_state()
    save_file(state, tmp_path / "w.safetensors")
    model = load_checkpoint(Small(), tmp_path / "w.safetensors")
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_load_fp16_file_is_cast_to_model_dtype(tmp_path: Path) -> None:
    state = _trained_state()
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, tmp_path / "h.safetensors")
    model = load_checkpoint(Small(), tmp_path / "h.safetensors")
    assert model.fc.weight.dtype == torch.float32
    assert torch.allclose(model.fc.weight, state["fc.weight"], atol=1e-2)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "state_dict_ema", "module_prefix", "plain"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_load_torch_checkpoint_wrappers(tmp_path: Path, wrap: str, suffix: str) -> None:
    state = _trained_state()
    if wrap == "module_prefix":
        obj: object = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap == "plain":
        obj = state
    else:
        obj = {wrap: state, "epoch": 3}
    torch.save(obj, tmp_path / f"ck{suffix}")
    model = load_checkpoint(Small(), tmp_path / f"ck{suffix}")
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert int(model.steps) == int(state["steps"])


# ---------------------------------------------------------------- loading: errors leave the model untouched


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(Small(), tmp_path / "nope.safetensors")


def test_nan_tensor_is_rejected_and_model_unchanged(tmp_path: Path) -> None:
    state = _trained_state()
    state["norm.weight"][1] = math.nan
    save_file(state, tmp_path / "nan.safetensors")
    model = Small()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"norm\.weight") as err:
        load_checkpoint(model, tmp_path / "nan.safetensors")
    assert "NaN" in str(err.value) and "fc.weight" not in str(err.value)
    _assert_unchanged(model, before)


def test_inf_tensor_is_rejected(tmp_path: Path) -> None:
    state = _trained_state()
    state["fc.bias"][0] = math.inf
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=r"fc\.bias"):
        load_checkpoint(Small(), tmp_path / "inf.pth")


def test_wrong_keys_are_listed_and_model_unchanged(tmp_path: Path) -> None:
    state = _trained_state()
    state["extra.weight"] = torch.ones(2)
    del state["norm.bias"]
    save_file(state, tmp_path / "keys.safetensors")
    model = Small()
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, tmp_path / "keys.safetensors")
    msg = str(err.value)
    assert "missing keys: norm.bias" in msg and "unexpected keys: extra.weight" in msg
    _assert_unchanged(model, before)


def test_shape_mismatch_is_listed_and_model_unchanged(tmp_path: Path) -> None:
    state = _trained_state()
    state["fc.weight"] = torch.randn(5, 4)
    save_file(state, tmp_path / "shape.safetensors")
    model = Small()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"fc\.weight \(5, 4\) vs model \(3, 4\)"):
        load_checkpoint(model, tmp_path / "shape.safetensors")
    _assert_unchanged(model, before)
    # Shape mismatches are errors even when missing/unexpected keys are tolerated.
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(model, tmp_path / "shape.safetensors", strict=False)
    _assert_unchanged(model, before)


def test_non_strict_tolerates_missing_and_unexpected(tmp_path: Path) -> None:
    state = _trained_state()
    del state["norm.bias"]
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "partial.safetensors")
    model = Small()
    old_bias = model.norm.bias.clone()
    load_checkpoint(model, tmp_path / "partial.safetensors", strict=False)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.norm.bias, old_bias)


def test_pickled_objects_are_refused_with_advice(tmp_path: Path) -> None:
    # timm training checkpoints carry an argparse.Namespace, which weights_only loading refuses.
    torch.save({"model": _trained_state(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_checkpoint(Small(), tmp_path / "pickled.pth")


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_checkpoint(Small(), tmp_path / "w.npz")


# ---------------------------------------------------------------- create_model


def test_timm_name_random_init_eval_mode() -> None:
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=7)
    assert not model.training
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_timm_name_with_checkpoint(tmp_path: Path) -> None:
    ref = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=7)
    save_file(ref.state_dict(), tmp_path / "ref.safetensors")
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=7,
                         checkpoint=tmp_path / "ref.safetensors")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), ref(x))


def test_testbed_architecture_without_assets() -> None:
    model = create_model("testbed", shared_weights=False)
    assert not model.training
    assert model.patch_embed.num_patches == 64 and model.embed_dim == 192 and len(model.blocks) == 12
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_testbed_loads_shared_weights() -> None:
    _assets_or_skip()
    model = create_model("fmnist_vit_tiny")
    expected = load_file(str(assets.testbed_paths().weights))
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k
    alias = create_model("testbed")
    assert torch.equal(alias.head.weight, model.head.weight)


def test_dinov2_loads_shared_weights() -> None:
    _assets_or_skip()
    model = create_model("dinov2_vits14")
    assert model.pos_embed.dtype == torch.float32
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    expected = load_file(str(assets.dinov2_weights_path()))
    assert torch.equal(model.blocks[3].attn.qkv.weight, expected["blocks.3.attn.qkv.weight"].float())
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 384) and torch.isfinite(out).all()


# ---------------------------------------------------------------- assets


def test_assets_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    assert assets.assets_dir() == tmp_path.resolve()


def test_assets_env_var_not_a_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="VITPRUNE_ASSETS"):
        assets.assets_dir()


def test_assets_not_found_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(assets, "_REPO_ROOT", work)
    with pytest.raises(FileNotFoundError, match="set the environment variable VITPRUNE_ASSETS"):
        assets.assets_dir()


def test_assets_found_next_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    (tmp_path / "shared" / "assets").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert assets.assets_dir() == (tmp_path / "shared" / "assets").resolve()


def test_testbed_paths_and_stated_top1() -> None:
    _assets_or_skip()
    paths = assets.testbed_paths()
    assert all(p.is_file() for p in paths)
    assert 0.0 < assets.testbed_stated_top1() <= 1.0
