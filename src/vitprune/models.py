"""Build models by name and load checkpoints safely (validate everything before touching the model).

Two built-in names load the offline shared weights: ``"fmnist_vit_tiny"`` (alias ``"testbed"``) and
``"dinov2_vits14"``; every other name is passed to ``timm.create_model``.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitprune import assets

TESTBED_NAMES = ("fmnist_vit_tiny", "testbed")
DINOV2_NAMES = ("dinov2_vits14",)

# Architecture of the shared Fashion-MNIST testbed (the DeiT-Tiny body on 32x32 grayscale, 4 px patches).
TESTBED_ARGS: dict[str, Any] = dict(
    img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3
)
DINOV2_ARGS: dict[str, Any] = dict(img_size=224, num_classes=0)

_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error lists


def create_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    shared_weights: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Create a model in eval mode.

    ``"fmnist_vit_tiny"``/``"testbed"`` and ``"dinov2_vits14"`` load the shared-asset weights unless
    ``checkpoint`` is given or ``shared_weights=False`` (random init, e.g. for tests without assets).
    Other names go to ``timm.create_model(name, pretrained=pretrained, **kwargs)``: random init unless
    ``pretrained`` (needs the internet or a timm cache) or ``checkpoint``.
    ``"hf:<...>"`` builds a Hugging Face transformers model wrapped for the tools (``HFVisionModel``; its ``.hf`` is
    the transformers model): ``hf:dinov2_vits14`` (shared weights converted from timm), ``hf:<transformers class>``
    (random init), ``hf:<config.json or save_pretrained folder>``; see ``vitprune.backends.hf_convert``.
    ``"open_clip:<name>"`` (e.g. ``open_clip:ViT-B-32``) builds the image tower ``open_clip.create_model(name).visual``
    (random init unless ``checkpoint``; needs ``pip install 'vitprune[open_clip]'``).
    """
    if name.startswith("hf:"):
        from vitprune.backends.hf_convert import create_hf_model

        return create_hf_model(name[3:], checkpoint=checkpoint, pretrained=pretrained,
                               shared_weights=shared_weights, **kwargs)
    if name.startswith("open_clip:"):
        from vitprune.backends.open_clip import create_open_clip_visual  # without open_clip: says what to install

        return create_open_clip_visual(name.removeprefix("open_clip:"), checkpoint=checkpoint, pretrained=pretrained,
                                       **kwargs)
    key = name.lower()
    if key in TESTBED_NAMES:
        model: nn.Module = VisionTransformer(**{**TESTBED_ARGS, **kwargs})
        # Describe the input so timm-style tooling sees 1x32x32; the real preprocessing (normalise,
        # then pad 28->32) lives in vitprune.measure.data.TESTBED_PREPROCESS.
        model.pretrained_cfg = dict(
            architecture="fmnist_vit_tiny", input_size=(1, 32, 32), mean=(0.2860,), std=(0.3530,),
            crop_pct=1.0, interpolation="bilinear", num_classes=model.num_classes,
        )
        model.default_cfg = model.pretrained_cfg
        default_weights = (lambda: assets.testbed_paths().weights) if shared_weights else None
    elif key in DINOV2_NAMES:
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **{**DINOV2_ARGS, **kwargs})
        # timm's default cfg says 518x518; these weights are resampled to 224 (README: shorter side 256 + crop 224).
        size = tuple(model.patch_embed.img_size)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, *size), "crop_pct": 224 / 256}
        model.default_cfg = model.pretrained_cfg
        default_weights = assets.dinov2_weights_path if shared_weights else None
    else:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        default_weights = None

    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif default_weights is not None:
        load_checkpoint(model, default_weights())
    return model.eval()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on the CPU; a missing, truncated or corrupt file is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return dict(load_file(str(path), device="cpu"))
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({err}): it is truncated, corrupt or another format; "
            "re-download or re-save it"
        ) from err


def _read_state_dict(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        corrupt = f"{path} is not a readable PyTorch checkpoint: it is truncated, corrupt or another format"
        with open(path, "rb") as f:
            if not zipfile.is_zipfile(f) and f.seek(0) == 0 and f.read(1) != b"\x80":  # torch.save: zip or pickle
                raise ValueError(f"{corrupt}; re-download or re-save it")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            lines = str(err).strip().splitlines()
            blocked = [line.strip() for line in lines if "Unsupported global" in line]
            if not blocked:
                raise ValueError(f"{corrupt} ({lines[0]})") from err
            first = blocked[0]
            raise ValueError(
                f"{path} holds pickled objects other than tensors, which are not loaded for safety; "
                f"re-save just the state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors. "
                f"({first})"
            ) from err
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"{corrupt} ({str(err).strip().splitlines()[0]})") from err
        return _unwrap(obj, path)
    raise ValueError(f"unsupported checkpoint type {path.name!r}: use .safetensors, .pth, .pt or .bin.")


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    """Find the state dict inside common training-checkpoint wrappers."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not contain a state dict (found {type(obj).__name__}); save model.state_dict().")
    return dict(obj)


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _first(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights from ``.safetensors`` or ``.pth/.pt/.bin`` into ``model``, all-or-nothing.

    Every check (non-finite values, missing/unexpected keys when ``strict``, shape mismatches) runs
    before ``load_state_dict``, so a failed load leaves the model exactly as it was. Floating tensors
    are cast to the model's dtype (e.g. fp16 files into a float32 model). Returns ``model``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass the path of an existing .safetensors or .pth file.")
    state = _strip_prefixes(_read_state_dict(path))
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {_first(not_tensors)}; save model.state_dict().")

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values (NaN/Inf) in {_first(bad)}; the checkpoint is corrupt or diverged.")

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_first(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_first(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if problems:
        raise ValueError(
            f"{path} does not fit this model ({'; '.join(problems)}); "
            f"check that the model name/arguments match the checkpoint's architecture."
        )

    cast = {
        k: (v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v)
        for k, v in state.items()
        if k in own
    }
    model.load_state_dict(cast, strict=strict)
    return model
